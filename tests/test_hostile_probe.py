"""The hostile-input probe (benchmarks/probe_hostile.py) as a test: every case
refused or neutralised, and no file outside the probe's cache changed."""
import importlib.util
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parent.parent / "benchmarks" / "probe_hostile.py"


def _probe_module():
    spec = importlib.util.spec_from_file_location("probe_hostile", PROBE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


def test_every_hostile_input_is_refused_or_neutralised(tmp_path, converted_embedded_model):
    # converted_embedded_model: the pages load the embedded default in the sidebar, and the
    # probe reads its converted copy instead of converting it again within a page's time limit.
    probe = _probe_module()
    rows = probe.run_probe(tmp_path)
    assert len(rows) >= 21  # at least 20 hostile inputs, and the check of files outside the cache
    failed = [f"{r.case}: {r.detail}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
