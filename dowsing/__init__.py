"""dowsing: which concept domain would gain most from more data.

Influence functions restricted to each domain's concept direction, after the
Data Dowsing paper. The public entry points are `analyze` (a loaded model and
domains in, a `Result` out) and `run_analysis` (model id in, cached).
"""
from .config import AnalysisConfig
from .result import DomainResult, Result

__all__ = ["AnalysisConfig", "DomainResult", "Result", "analyze", "run_analysis"]


def analyze(model, domains, config=None, progress=None):
    from .pipelines.analysis import analyze as _analyze

    return _analyze(model, domains, config, progress)


def run_analysis(model_id, domains, config=None, progress=None, use_cache=True):
    from .pipelines.analysis import run_analysis as _run

    return _run(model_id, domains, config, progress, use_cache)
