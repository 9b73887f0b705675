"""Every estimator of a domain's priority, declared in the registry
(`registry`) by the family module that computes it. Importing the families
registers them; the order here is the order of every list and leaderboard."""
from . import subspace  # noqa: F401  (each family module registers its estimators)
from . import alignment  # noqa: F401
from . import ekfac  # noqa: F401
from . import trajectory  # noqa: F401
from . import airrep  # noqa: F401
from . import pilot  # noqa: F401
from .pilot import LOOKAHEAD_SIGN, PILOT_CURVE, PILOT_GAIN  # noqa: F401
from .subspace import MEAN_LOSS, PAPER  # noqa: F401
from .context import EstimatorContext, EstimatorSettings, build_context, estimator_settings  # noqa: F401
from .registry import (ESTIMATORS, FAMILIES, Estimator, EstimatorScore, by_family, check_names, compute,  # noqa: F401
                       family_unit, get, label, names)
