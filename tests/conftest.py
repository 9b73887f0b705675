"""Fixtures every test module shares, and what makes the suite safe and
quick on two pytest-xdist workers (`make test`: -n 2 --dist loadfile).

- One thread per test process: two workers share two cores, and the CLI
  runs, job workers and Streamlit servers a test starts inherit it.
- Each test process has its own cache folder (DOWSING_CACHE), so two
  workers never share cache/ (results, fine-tuned units, workspaces).
- A test module runs whole in one worker (--dist loadfile): its module
  fixtures are made once and the modules whose tests build on each other
  (test_app.py) keep their order. (pytest-xdist 3.8's loadgroup does not
  group under pytest 9.2: it renames items through an attribute pytest no
  longer reads.) The longest modules are handed out first.
- The real embedded model is converted into cache/ once, under a lock,
  before the two tests that use it (they may run at the same time).
"""
import fcntl
import os
import sys
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from tiny_models import build_tiny  # noqa: E402

# The longest modules first (wall time on two workers), so that no long one starts last.
LONGEST_FIRST = ("test_cli.py", "test_app.py", "test_executor.py", "test_benchmark.py", "test_registry.py",
                 "test_jobs.py", "test_spare_worker.py", "test_browser.py", "test_trajectory.py", "test_engine_exact.py",
                 "test_checkpoints.py", "test_validate.py")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the order is the order modules are handed out
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def worker_cache(tmp_path_factory):
    """This process's cache folder; a test that wants its own still sets DOWSING_CACHE.
    The app and its jobs may load models from the tests' temporary folders
    (where the tiny models are built) and the repository's cache/models."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOWSING_CACHE", str(folder))
        mp.setenv("DOWSING_MODEL_ROOTS", os.pathsep.join([str(tmp_path_factory.getbasetemp()),
                                                          str(REPO / "cache" / "models")]))
        yield folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def converted_embedded_model() -> Path:
    """The embedded default model's safetensors copy under the repo's cache/
    (made once on a fresh checkout, 10-15 s), shared by every process."""
    from dowsing.access.models import converted_dir, embedded_gguf_path

    cache = REPO / "cache"
    cache.mkdir(exist_ok=True)
    with open(cache / ".convert.lock", "w") as lock, pytest.MonkeyPatch.context() as mp:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker may be converting it right now
        mp.setenv("DOWSING_CACHE", str(cache))
        return converted_dir(embedded_gguf_path())


@pytest.fixture(scope="session")
def tiny_embedded_dirs(tmp_path_factory):
    """kind -> a tiny model with the embedded model's own tokenizer (49,152
    tokens), built on first use, for the tests whose thresholds were set on it."""
    folders = {}

    def get(kind):
        if kind not in folders:
            folders[kind] = build_tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}-embedded"), tokenizer="embedded")
        return folders[kind]

    return get


@pytest.fixture(scope="session")
def tiny_gpt2_embedded_dir(tiny_embedded_dirs) -> Path:
    return tiny_embedded_dirs("gpt2")


@pytest.fixture(scope="session")
def _float64_models(tiny_gpt2_dir, tiny_llama_dir, tiny_embedded_dirs):
    """The tiny models loaded in float64, each once per process (on first use);
    kind "llama-embedded" and "gpt2-embedded" have the embedded tokenizer."""
    from dowsing.access.models import load_model

    folders = {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}
    loaded = {}

    def get(kind):
        if kind not in loaded:
            folder = folders[kind] if kind in folders else tiny_embedded_dirs(kind.split("-")[0])
            loaded[kind] = load_model(str(folder), dtype="float64")
        model = loaded[kind]
        # As load_model leaves it: a test before may have switched gradients on.
        model.model.eval()
        for param in model.model.parameters():
            param.requires_grad_(False)
            param.grad = None
        return model

    return get


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny64(request, _float64_models):
    """Each tiny model in float64 (the module's tests run once per model)."""
    return _float64_models(request.param)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny64_embedded(request, _float64_models):
    """tiny64 with the embedded model's tokenizer."""
    return _float64_models(f"{request.param}-embedded")


@pytest.fixture(scope="module")
def tiny_llama64(_float64_models):
    return _float64_models("llama")


@pytest.fixture(scope="module")
def gpt2_64(_float64_models):
    return _float64_models("gpt2")


@pytest.fixture(scope="session")
def ray_executor():
    """One local Ray head (2 CPUs, no dashboard) for the whole session."""
    ray = pytest.importorskip("ray")
    from dowsing.pipelines.executor import ExecutorConfig, make_executor

    executor = make_executor(ExecutorConfig(kind="ray", num_cpus=2, object_store_mb=400))
    yield executor
    ray.shutdown()
