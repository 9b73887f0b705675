"""The analysis configuration: its checks, and how a run's settings are described."""
from __future__ import annotations

import pytest

from dowsing.config import AnalysisConfig, settings_changes
from dowsing.background.jobs import JobState


def test_defaults_describe_as_nothing_and_changes_as_name_value_pairs():
    assert settings_changes(AnalysisConfig().to_dict()) == ""
    assert settings_changes(AnalysisConfig(curvature="ggn", damping=0.01).to_dict()) == \
        "damping = 0.01, curvature = ggn"
    # Results cached by older engines may lack fields or hold unknown ones.
    assert settings_changes({"solver": "cg", "retired_knob": 3}) == "solver = cg"
    assert settings_changes({}) == ""


@pytest.mark.parametrize("kwargs,pattern", [
    ({"damping": -1.0}, "damping"), ({"damping": float("nan")}, "damping"), ({"blocks": 0}, "blocks"),
    ({"solver": "magic"}, "solver"), ({"curvature": "fisher"}, "curvature"), ({"dtype": "bfloat16"}, "cuda"),
    ({"saturation_points": 5}, "saturation_points"), ({"bootstrap_resamples": 10}, "bootstrap_resamples"),
    ({"cg_rtol": 0.0}, "cg_rtol"),
])
def test_bad_settings_are_refused_with_a_message_naming_them(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AnalysisConfig(**kwargs)


def test_a_run_label_names_its_non_default_settings():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pages._shared import job_label

    request = {"config": AnalysisConfig(curvature="ggn").to_dict()}
    state = JobState(job_id="j", status="done", created_at="2026-01-02T03:04:05+00:00", request=request,
                     summary={"top_domain": "Biology", "domain_set_name": "Science", "model_id": None})
    assert job_label(state) == "2026-01-02 03:04 · Biology first · Science · embedded default · curvature = ggn"
    default = JobState(job_id="k", status="done", created_at="2026-01-02T03:04:05+00:00",
                       request={"config": AnalysisConfig().to_dict()}, summary={"top_domain": "Biology"})
    assert job_label(default).endswith("embedded default")


def test_ranking_estimator_settings():
    from dowsing import estimators
    from dowsing.config import DEFAULT_ESTIMATOR
    from dowsing.pipelines.ranking import check_estimator

    offered = estimators.names("analysis")
    assert AnalysisConfig().estimator == DEFAULT_ESTIMATOR in offered
    assert estimators.label("paper") == "Paper: concept-subspace influence"
    other = next(name for name in offered if name != DEFAULT_ESTIMATOR)
    assert settings_changes(AnalysisConfig(estimator=other, align_blocks=2).to_dict()) == \
        f"estimator = {other}, align_blocks = 2"
    for kwargs, pattern in (({"align_blocks": 0}, "align_blocks"), ({"adam_batches": 0}, "adam_batches"),
                            ({"align_blocks": 1.5}, "align_blocks"), ({"estimator": ""}, "estimator")):
        with pytest.raises(ValueError, match=pattern) as exc:
            AnalysisConfig(**kwargs)
        assert "\n" not in str(exc.value)
    # an estimator the registry does not offer to analyses, or one without what it needs, is refused in one line
    for kwargs, pattern in (({"estimator": "tracin"}, "tracin"), ({"estimator": "bogus"}, "bogus"),
                            ({"estimator": "diffin"}, "checkpoints")):
        with pytest.raises(ValueError, match=pattern) as exc:
            check_estimator(AnalysisConfig(**kwargs))
        assert "\n" not in str(exc.value)
    assert AnalysisConfig.from_dict(AnalysisConfig(estimator="paper").to_dict()).estimator == "paper"
