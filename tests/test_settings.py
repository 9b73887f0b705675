"""The settings the pipelines share (`dowsing.settings`): each concern's
checks, the same refusal whichever pipeline a bad value is given to, the
pipelines' stored forms unchanged, and one builder of an estimator's
settings that gives what each pipeline filled in by hand before."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from dowsing.config import DEFAULT_ESTIMATOR, AnalysisConfig
from dowsing.estimators import EstimatorSettings, estimator_settings, names
from dowsing.kernels.pilots import PILOT_RECIPE
from dowsing.kernels.training import Recipe
from dowsing.pipelines.plan import PilotConfig, PlanConfig
from dowsing.pipelines.ranking import ranking_settings
from dowsing.settings import BootstrapSettings, InfluenceSettings, ModelSettings
from dowsing.validation.benchmark import BenchmarkConfig, estimator_context, main_recipe
from dowsing.validation.finetune import validation_recipe
from dowsing.validation.validate import ValidationConfig, validation_settings


def _refusal(make, **fields) -> str:
    with pytest.raises(ValueError) as raised:
        make(**fields)
    return str(raised.value)


# --- each concern checks its own fields ------------------------------------------

@pytest.mark.parametrize("fields,message", [
    ({"device": "tpu"}, "device must be one of cpu, cuda, got 'tpu'"),
    ({"dtype": "float16"}, "dtype must be one of float32, float64, bfloat16, got 'float16'"),
    ({"dtype": "bfloat16"}, "bfloat16 is only supported with device cuda"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
])
def test_model_settings_refuse_what_cannot_run(fields, message):
    assert _refusal(ModelSettings, **fields) == message


def test_model_settings_take_bfloat16_on_cuda_and_default_to_the_cpu_in_float32():
    assert ModelSettings("cuda", "bfloat16", 1).dtype == "bfloat16"
    assert ModelSettings() == ModelSettings("cpu", "float32", 16)


@pytest.mark.parametrize("damping", [-1.0, float("nan"), float("inf"), "0.1", None])
def test_influence_settings_refuse_a_damping_that_is_not_a_finite_number_at_least_zero(damping):
    assert _refusal(InfluenceSettings, damping=damping) == f"damping must be a finite number >= 0, got {damping!r}"


@pytest.mark.parametrize("fields,message", [
    ({"align_blocks": 0}, "align_blocks must be an integer >= 1, got 0"),
    ({"align_blocks": 1.5}, "align_blocks must be an integer >= 1, got 1.5"),
    ({"adam_batches": 0}, "adam_batches must be an integer >= 1, got 0"),
    ({"checkpoint_lr": 0.0}, "checkpoint_lr must be > 0, got 0.0"),
])
def test_influence_settings_refuse_blocks_batches_and_step_sizes_out_of_range(fields, message):
    assert _refusal(InfluenceSettings, **fields) == message


def test_influence_settings_take_zero_damping_and_a_whole_float_of_blocks():
    assert InfluenceSettings(damping=0, align_blocks=2.0).damping == 0


def test_bootstrap_settings_name_the_pipelines_field_and_its_own_minimum():
    assert _refusal(BootstrapSettings, resamples=199, minimum=200) == "bootstrap_resamples must be >= 200, got 199"
    assert _refusal(BootstrapSettings, resamples=-1, field_name="bootstrap") == "bootstrap must be >= 0, got -1"
    assert BootstrapSettings(200, 3, 200).resamples == 200
    assert BootstrapSettings(0).seed == 0
    # the minimum and the field's name check; they are not settings, so they neither compare nor are kept
    assert [f.name for f in dataclasses.fields(BootstrapSettings)] == ["resamples", "seed"]
    assert BootstrapSettings(300, 1, 200, "x") == BootstrapSettings(300, 1)


# --- every pipeline refuses a bad shared value with the same message ----------------

PIPELINES = {
    "analysis": lambda **f: AnalysisConfig(**f),
    "plan": lambda **f: PlanConfig(budget=10, **f),
    "pilot": lambda **f: PilotConfig(**f),
    "validation": lambda **f: ValidationConfig(**f),
    "benchmark": lambda **f: BenchmarkConfig(**f),
}
# which pipelines carry which shared field
CARRY = {
    "batch_size": ("analysis", "plan", "pilot", "validation", "benchmark"),
    "device": ("analysis", "plan", "pilot"),
    "dtype": ("analysis", "plan", "pilot"),
    "damping": ("analysis", "validation", "benchmark"),
    "align_blocks": ("analysis", "benchmark"),
    "adam_batches": ("analysis", "benchmark"),
    "checkpoint_lr": ("analysis", "validation", "benchmark"),
}
BAD = [
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("device", "tpu", "device must be one of cpu, cuda, got 'tpu'"),
    ("dtype", "float16", "dtype must be one of float32, float64, bfloat16, got 'float16'"),
    ("dtype", "bfloat16", "bfloat16 is only supported with device cuda"),
    ("damping", -1.0, "damping must be a finite number >= 0, got -1.0"),
    ("damping", float("nan"), "damping must be a finite number >= 0, got nan"),
    ("align_blocks", 0, "align_blocks must be an integer >= 1, got 0"),
    ("adam_batches", 0, "adam_batches must be an integer >= 1, got 0"),
    ("checkpoint_lr", -1.0, "checkpoint_lr must be > 0, got -1.0"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_every_pipeline_refuses_a_bad_shared_value_with_one_message(name, value, message):
    refused = {pipeline: _refusal(PIPELINES[pipeline], **{name: value}) for pipeline in CARRY[name]}
    assert refused == {pipeline: message for pipeline in CARRY[name]}


# each pipeline's least number of resamples, as before the settings were shared
MINIMUM_RESAMPLES = {"analysis": ("bootstrap_resamples", 200), "plan": ("bootstrap_resamples", 100),
                     "validation": ("bootstrap", 0), "benchmark": ("bootstrap", 0)}


@pytest.mark.parametrize("pipeline", sorted(MINIMUM_RESAMPLES))
def test_each_pipeline_keeps_its_own_least_number_of_resamples(pipeline):
    field, least = MINIMUM_RESAMPLES[pipeline]
    make = PIPELINES[pipeline]
    assert _refusal(make, **{field: least - 1}) == f"{field} must be >= {least}, got {least - 1}"
    config = make(**{field: least, "seed": 5})
    assert config.bootstrap_settings() == BootstrapSettings(least, 5)


def test_the_pipelines_expose_the_settings_their_fields_make():
    analysis = AnalysisConfig(device="cuda", dtype="bfloat16", batch_size=4, damping=0.1, align_blocks=2,
                              adam_batches=3, checkpoint_lr=0.5)
    assert analysis.model_settings() == ModelSettings("cuda", "bfloat16", 4)
    assert analysis.influence_settings() == InfluenceSettings(0.1, 2, 3, 0.5)
    plan = PlanConfig(budget=5, device="cuda", dtype="float64", batch_size=2, seed=4)
    assert plan.model_settings() == plan.pilot_config().model_settings() == ModelSettings("cuda", "float64", 2)
    assert plan.bootstrap_settings() == BootstrapSettings(1000, 4)
    # the validation loads a model by id in float32 on the CPU; the benchmark on the run's device
    assert ValidationConfig(batch_size=3).model_settings() == ModelSettings("cpu", "float32", 3)
    assert BenchmarkConfig(batch_size=3).model_settings("cuda") == ModelSettings("cuda", "float32", 3)
    assert ValidationConfig(damping=0.2).influence_settings() == InfluenceSettings(damping=0.2)
    assert BenchmarkConfig(damping=0.2, align_blocks=1, adam_batches=2).influence_settings() == \
        InfluenceSettings(0.2, 1, 2)


# --- the stored forms do not change ------------------------------------------------

# Each pipeline's defaults as to_dict() gave them before the settings were shared; the
# estimator lists come from the registry and the default estimator from the shipped evidence.
DEFAULTS = {
    "analysis": {
        "damping": 0.001, "blocks": 1, "solver": "auto", "curvature": "hessian", "device": "cpu",
        "dtype": "float32", "cg_rtol": 1e-06, "cg_maxiter": 0, "saturation_points": 24,
        "saturation_max_factor": 1000.0, "batch_size": 16, "bootstrap_resamples": 200, "seed": 0,
        "estimator": DEFAULT_ESTIMATOR, "align_blocks": 4, "adam_batches": 8, "checkpoints": [],
        "checkpoint_lr": None, "diagnose": True, "stage": "all"},
    "plan": {
        "budget": 10, "budget_unit": "examples", "costs": [], "caps": [], "weights": [], "pilot_sizes": [2, 4, 8],
        "seed": 0, "bootstrap_resamples": 1000, "device": "cpu", "dtype": "float32", "batch_size": 16, "have": 0,
        "have_by_domain": [], "rule": "expected", "shrink": False, "collected": [], "round": 1, "transfer": False},
    "pilot": {"pilot_sizes": [2, 4, 8], "seed": 0, "device": "cpu", "dtype": "float32", "batch_size": 16,
              "transfer": False},
    "validation": {
        "seed": 0, "held_out_fraction": 0.5, "eps": [0.01, 0.1, 0.3], "damping": 0.001, "newton_steps": 2,
        "finetune_steps": 8, "finetune_blocks": 4, "finetune_lr": 3e-05, "finetune_batch": 8,
        "finetune_added_batch": 4, "finetune_added_weight": 1.0, "estimators": list(names("validation")),
        "bootstrap": 1000, "interval_pct": 90.0, "lissa_depth": 1000, "lissa_batch_facts": 8, "subspace": True,
        "finetune": True, "batch_size": 16, "checkpoints": [], "checkpoint_lr": None},
    "benchmark": {
        "seed": 0, "seeds": 2, "sample_facts": 16, "test_facts": 12, "doses": [8, 32], "second_reading": True,
        "held_out_fraction": 0.5, "max_facts": 0,
        "recipes": [{"name": "adamw", "optimizer": "adamw", "lr": 3e-05, "steps": 8, "blocks": 4, "batch": 8,
                     "added_batch": 8, "added_weight": 1.0}],
        "main_recipe": "adamw", "estimators": list(names("benchmark")), "damping": 0.001, "align_blocks": 4,
        "adam_batches": 8, "ekfac_blocks": 2, "ekfac_fit_facts": 128, "pilot_sizes": [2, 4, 8], "plan_budgets": [],
        "curve_domains": ["Cooking", "World geography", "Physics", "Heraldry", "Norwegian (Bokmål)",
                          "Invented: Kelvaran archipelago", "Noise: parcel scans", "Redundant: railways"],
        "bootstrap": 2000, "interval_pct": 90.0, "batch_size": 16, "checkpoints": [], "checkpoint_lr": None},
}


@pytest.mark.parametrize("pipeline", sorted(DEFAULTS))
def test_each_pipelines_stored_form_of_its_defaults_is_unchanged(pipeline):
    config = PIPELINES[pipeline]()
    assert config.to_dict() == DEFAULTS[pipeline]
    # field order too: it is the order of the stored JSON
    assert list(config.to_dict()) == list(DEFAULTS[pipeline])
    assert json.dumps(config.to_dict(), sort_keys=True) == json.dumps(DEFAULTS[pipeline], sort_keys=True)
    # and a stored form loads back as the same configuration
    assert type(config).from_dict(DEFAULTS[pipeline]) == config


def test_the_cache_keys_settings_are_unchanged():
    assert AnalysisConfig().canonical_json() == json.dumps(DEFAULTS["analysis"], sort_keys=True)
    settings = {"pilot_sizes": [2, 4, 8], "seed": 0, "device": "cpu", "dtype": "float32", "batch_size": 16,
                "recipe": PILOT_RECIPE.label()}
    assert PilotConfig().curve_settings() == PlanConfig(budget=10).curve_settings() == settings


# --- one builder of an estimator's settings ----------------------------------------

ANALYSES = [AnalysisConfig(),
            AnalysisConfig(damping=0.05, align_blocks=3, adam_batches=5, seed=7, batch_size=4,
                           checkpoints=("a", "b"), checkpoint_lr=0.01)]


@pytest.mark.parametrize("config", ANALYSES)
@pytest.mark.parametrize("depth", [2, 12])
def test_the_rankings_settings_are_what_the_analysis_filled_in_by_hand(config, depth):
    by_hand = EstimatorSettings(damping=config.damping, blocks=config.align_blocks, adam_batches=config.adam_batches,
                                seed=config.seed, batch_size=config.batch_size,
                                recipe=Recipe("checkpoints", "adamw", blocks=min(config.align_blocks, depth)),
                                checkpoint_lr=config.checkpoint_lr, all_facts=True)
    assert ranking_settings(config, depth) == by_hand


@pytest.mark.parametrize("config", ANALYSES)
def test_the_diagnosis_pilots_read_what_the_analysis_filled_in_by_hand(config):
    by_hand = EstimatorSettings(seed=config.seed, batch_size=config.batch_size, all_facts=True)
    built = estimator_settings(config, all_facts=True)
    # the pilot gain reads these alone (`estimators.pilot`); the rest now carries the run's own values
    read = ("seed", "batch_size", "all_facts", "pilot_sizes", "pilot_target", "recipe")
    assert {f: getattr(built, f) for f in read} == {f: getattr(by_hand, f) for f in read}
    if config == AnalysisConfig():
        assert built == by_hand
    assert estimator_settings(config).pilot_sizes == EstimatorSettings().pilot_sizes


BENCHMARKS = [BenchmarkConfig(), BenchmarkConfig.quick(),
              BenchmarkConfig.quick(damping=0.02, seed=3, batch_size=5, checkpoints=("a", "b"), checkpoint_lr=0.5,
                                    ekfac_fit_facts=0, align_blocks=6, ekfac_blocks=5, adam_batches=2)]


@pytest.mark.parametrize("config", BENCHMARKS)
@pytest.mark.parametrize("keep", [1, 4])
def test_the_benchmarks_settings_are_what_it_filled_in_by_hand(config, keep):
    run = SimpleNamespace(keep=keep, split=None)
    by_hand = EstimatorSettings(damping=config.damping, blocks=min(config.align_blocks, run.keep),
                                adam_batches=config.adam_batches, seed=config.seed,
                                ekfac_blocks=min(config.ekfac_blocks, run.keep),
                                ekfac_fit_facts=config.ekfac_fit_facts or None, batch_size=config.batch_size,
                                recipe=main_recipe(config), checkpoint_lr=config.checkpoint_lr,
                                pilot_sizes=config.pilot_sizes, pilot_target=config.doses[-1])
    assert estimator_context(None, run, config, None).settings == by_hand


VALIDATIONS = [ValidationConfig(),
               ValidationConfig(damping=0.3, seed=9, lissa_depth=50, lissa_batch_facts=2, batch_size=3,
                                finetune_blocks=2, finetune_lr=1e-4, checkpoints=("a", "b"), checkpoint_lr=0.2)]


@pytest.mark.parametrize("config", VALIDATIONS)
@pytest.mark.parametrize("depth", [1, 6])
def test_the_validations_settings_are_what_it_filled_in_by_hand(config, depth):
    blocks = min(config.finetune_blocks, depth)
    by_hand = EstimatorSettings(
        damping=config.damping, blocks=blocks, seed=config.seed, lissa_depth=config.lissa_depth,
        lissa_batch_facts=config.lissa_batch_facts, batch_size=config.batch_size,
        recipe=validation_recipe(config, blocks), checkpoint_lr=config.checkpoint_lr)
    assert validation_settings(config, blocks) == by_hand
    # the validation's estimate read the default Adam minibatches
    assert validation_settings(config, blocks).adam_batches == EstimatorSettings().adam_batches
