"""Where independent units of work run: in this process, or as Ray tasks.

A *unit* is one piece of work that needs nothing from the others: one
counterfactual fine-tune, one learning-curve point, one domain's curvature,
solve and saturation fit. Every unit of a batch needs the same large input (a
model's weights and the cached block inputs, say): the *payload*. It is
shipped once and turned into a working *context* (a trainer, a model on its
device) by a `build` function once per process, never pickled into each task:

- `LocalExecutor` builds the context once in this process and runs the
  units one after the other, in order: exactly what the engine did before
  there was a choice. Ray is not imported.
- `RayExecutor` puts the payload into Ray's object store once (each node
  fetches it once), and each worker process builds the context on its first
  unit and keeps it for the next units of the same batch. The payload's
  reference travels inside a list so that Ray does not fetch and unpickle it
  for every task. Tasks are retried when a worker or node dies (`max_retries`),
  ask for a GPU when the work runs on CUDA, and are cancelled when the run is.

Each finished unit's value is written to a `UnitStore` as it arrives, under
the run's fingerprint, so a run started again after a crash, a cancel or a
lost node recomputes only the units that are missing. Values are stored with
`torch.save` and read back with `weights_only=True` (tensors, numbers,
strings, lists and dicts only: nothing in the cache can run code on load).
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

EXECUTORS = ("local", "ray")
WAIT_POLL_S = 0.5


class RunCancelled(BaseException):
    """The run was cancelled while units were outstanding. A BaseException so
    that no `except Exception` in the engine swallows it."""


@dataclass(frozen=True)
class ExecutorConfig:
    """Where units run.

    kind: "local" (in this process, the default) or "ray".
    address: where Ray runs. None starts a Ray instance on this machine
        with `num_cpus` CPUs (None: every core); "auto" joins the cluster this
        machine belongs to; "ray://host:10001" joins a remote cluster through
        Ray Client (dowsing's code is shipped with the job).
    cpus_per_task: CPUs each unit asks for; its torch threads.
    gpus_per_task: GPUs each unit asks for (set to 1 when the work runs on
        CUDA and this is left at 0).
    max_retries: how often a unit is run again when its worker or node dies.
    object_store_mb: the object store of a locally started Ray (None: Ray's
        default, 30% of memory).
    """

    kind: str = "local"
    address: str | None = None
    num_cpus: int | None = None
    cpus_per_task: int = 1
    gpus_per_task: float = 0.0
    max_retries: int = 3
    object_store_mb: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, not {self.kind!r}")
        if self.kind == "local" and self.address:
            raise ValueError("--ray-address needs --executor ray")
        if self.address is not None and not (self.address == "auto" or self.address.startswith("ray://")
                                             or ":" in self.address):
            raise ValueError(f"ray address {self.address!r}: use auto, host:port or ray://host:port")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("num_cpus must be >= 1")
        if self.cpus_per_task < 1 or self.gpus_per_task < 0 or self.max_retries < 0:
            raise ValueError("cpus_per_task must be >= 1, gpus_per_task and max_retries >= 0")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "address": self.address, "num_cpus": self.num_cpus,
                "cpus_per_task": self.cpus_per_task, "gpus_per_task": self.gpus_per_task,
                "max_retries": self.max_retries, "object_store_mb": self.object_store_mb}

    @classmethod
    def from_dict(cls, data: dict | None) -> "ExecutorConfig":
        return cls(**(data or {}))


@dataclass(frozen=True)
class Unit:
    """One unit of work: fn(context, *args). key names it within its run
    (the UnitStore key and the progress line)."""

    key: str
    args: tuple = ()


@dataclass
class Shared:
    """The payload every unit of a batch needs, and how a process turns it
    into the units' context. build must be a module-level function (Ray ships
    it by reference). name identifies the payload: a worker keeps one context
    per name. In-process, `context` may be given ready-made."""

    name: str
    payload: object = None
    build: Callable | None = None
    context: object = None


@dataclass
class UnitRecord:
    """Where and when one unit ran (for the scaling numbers)."""

    key: str
    node: str
    pid: int
    start: float  # time.time() on the worker
    end: float
    cached: bool = False


@dataclass
class Telemetry:
    records: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"units": [r.__dict__ for r in self.records]}


class UnitStore:
    """Finished units' values on disk (diskcache under cache/units), one
    namespace per run fingerprint."""

    def __init__(self, namespace: str, folder=None):
        from ..storage.caches import BOUNDED, DataCache
        from ..paths import cache_dir

        self.namespace = namespace
        # bytes of torch.save, read back with weights_only=True; the store itself never unpickles
        self._cache = DataCache(folder or cache_dir() / "units", **BOUNDED)

    def _key(self, key: str) -> str:
        return f"{self.namespace}/{key}"

    def get(self, key: str):
        blob = self._cache.get(self._key(key))
        if blob is None:
            return None
        try:
            import torch

            return torch.load(io.BytesIO(blob), weights_only=True)
        except Exception:  # a corrupt entry is recomputed, never used
            self._cache.delete(self._key(key))
            return None

    def put(self, key: str, value) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(value, buffer)
        self._cache.set(self._key(key), buffer.getvalue())

    def count(self) -> int:
        prefix = self.namespace + "/"
        return sum(1 for k in self._cache.iterkeys() if str(k).startswith(prefix))

    def clear(self) -> None:
        prefix = self.namespace + "/"
        for k in list(self._cache.iterkeys()):
            if str(k).startswith(prefix):
                self._cache.delete(k)


def fingerprint(*parts) -> str:
    """sha256 of the parts' reprs: the namespace of one run's units."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


OnDone = Callable[[str, object, int, int], None]  # (key, value, finished, total)


class _Pending:
    """Units started by `start`, collected by `wait`; `cancel` stops what is
    still outstanding."""

    def __init__(self, wait: Callable[[], dict], cancel: Callable[[], None] = lambda: None):
        self._wait = wait
        self._cancel = cancel
        self._values = None

    def wait(self) -> dict:
        if self._values is None:
            self._values = self._wait()
        return self._values

    def cancel(self) -> None:
        self._cancel()


def _cached(units, store):
    values, todo = {}, []
    for unit in units:
        value = store.get(unit.key) if store is not None else None
        if value is None:
            todo.append(unit)
        else:
            values[unit.key] = value
    return values, todo


def _report_cached(values: dict, total: int, on_done) -> int:
    """Report the units found in the store, counting up; their number."""
    for i, (key, value) in enumerate(values.items()):
        if on_done:
            on_done(key, value, i + 1, total)
    return len(values)


class LocalExecutor:
    """Units in this process, in order, when `wait` is called."""

    kind = "local"

    def __init__(self, config: ExecutorConfig | None = None):
        self.config = config or ExecutorConfig()
        self.telemetry = Telemetry()

    def describe(self) -> dict:
        return {"kind": "local", "CPU": os.cpu_count(), "GPU": 0, "nodes": 1}

    def start(self, fn: Callable, units: list, shared: Shared, store: UnitStore | None = None,
              on_done: OnDone | None = None, should_stop: Callable[[], bool] | None = None) -> _Pending:
        def run() -> dict:
            values, todo = _cached(units, store)
            for key in values:
                self.telemetry.records.append(UnitRecord(key, "local", os.getpid(), 0.0, 0.0, cached=True))
            finished = _report_cached(values, len(units), on_done)
            context = shared.context if shared.context is not None else shared.build(shared.payload)
            for unit in todo:
                if should_stop and should_stop():
                    raise RunCancelled()
                t0 = time.time()
                value = fn(context, *unit.args)
                self.telemetry.records.append(UnitRecord(unit.key, "local", os.getpid(), t0, time.time()))
                if store is not None:
                    store.put(unit.key, value)
                values[unit.key] = value
                finished += 1
                if on_done:
                    on_done(unit.key, value, finished, len(units))
            return {u.key: values[u.key] for u in units}

        return _Pending(run)

    def run(self, fn, units, shared, store=None, on_done=None, should_stop=None) -> dict:
        return self.start(fn, units, shared, store, on_done, should_stop).wait()

    def shutdown(self) -> None:
        pass


# --- Ray ------------------------------------------------------------------------------------------------

# In a Ray worker process: payload name -> built context. One at a time, so
# a long-lived worker never holds two models.
_CONTEXTS: dict = {}


def _run_remote(fn, build, name, holder, args, threads):
    import ray
    import torch

    torch.set_num_threads(threads)
    context = _CONTEXTS.get(name)
    if context is None:
        _CONTEXTS.clear()
        context = _CONTEXTS[name] = build(ray.get(holder[0]))
    t0 = time.time()
    value = fn(context, *args)
    node = ray.get_runtime_context().get_node_id()
    return value, (node, os.getpid(), t0, time.time())


def ray_runtime_env(address: str | None) -> dict:
    """Workers must import dowsing. On this machine they get the repo root on
    their path; on a cluster the package travels with the job."""
    from ..paths import REPO_ROOT

    if address is None:
        return {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    return {"py_modules": [str(REPO_ROOT / "dowsing")]}


def connect_ray(config: ExecutorConfig) -> float:
    """ray.init for the config (nothing when Ray is already up); seconds taken."""
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        return 0.0
    kwargs = dict(runtime_env=ray_runtime_env(config.address), log_to_driver=False, ignore_reinit_error=True)
    if config.address is None:
        kwargs.update(num_cpus=config.num_cpus or os.cpu_count(), include_dashboard=False)
        if config.object_store_mb:
            kwargs["object_store_memory"] = int(config.object_store_mb) * 2 ** 20
    else:
        _check_reachable(config.address)
        kwargs["address"] = config.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = config.address or "this machine"
        raise ValueError(f"could not start or reach Ray at {where}: {str(exc).splitlines()[0]}") from exc
    return time.perf_counter() - t0


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when nothing listens at a host:port
    address (Ray itself waits minutes for a GCS that is not there)."""
    import socket

    if address == "auto":
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not reach Ray at {address}: nothing answers there ({exc})") from exc


def cluster_resources() -> dict:
    """CPUs, GPUs and nodes of the connected Ray cluster."""
    import ray

    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"kind": "ray", "CPU": int(res.get("CPU", 0)), "GPU": int(res.get("GPU", 0)), "nodes": len(nodes)}


class RayExecutor:
    """Units as Ray tasks; see the module docstring."""

    kind = "ray"

    def __init__(self, config: ExecutorConfig | None = None, device: str = "cpu"):
        import ray

        self.config = config or ExecutorConfig(kind="ray")
        self.startup_s = connect_ray(self.config)
        gpus = self.config.gpus_per_task or (1.0 if device == "cuda" else 0.0)
        self._remote = ray.remote(_run_remote).options(
            num_cpus=self.config.cpus_per_task, num_gpus=gpus, max_retries=self.config.max_retries,
            retry_exceptions=False)
        self._refs: dict = {}  # payload name -> ObjectRef: each payload is put once
        self.telemetry = Telemetry()

    def describe(self) -> dict:
        return cluster_resources()

    def _payload_ref(self, shared: Shared):
        import ray

        if shared.name not in self._refs:
            payload = shared.payload if shared.payload is not None else shared.context
            self._refs[shared.name] = ray.put(payload)
        return self._refs[shared.name]

    def start(self, fn: Callable, units: list, shared: Shared, store: UnitStore | None = None,
              on_done: OnDone | None = None, should_stop: Callable[[], bool] | None = None) -> _Pending:
        """Submit every missing unit now; a thread of this process collects
        the results as they arrive (stores them, reports them), so they are
        saved even while this process does other work."""
        import ray

        values, todo = _cached(units, store)
        for key in values:
            self.telemetry.records.append(UnitRecord(key, "cached", 0, 0.0, 0.0, cached=True))
        build = shared.build or _identity
        holder = [self._payload_ref(shared)] if todo else None
        refs = {self._remote.remote(fn, build, shared.name, holder, unit.args, self.config.cpus_per_task): unit.key
                for unit in todo}
        stop = threading.Event()
        state = {"error": None, "finished": len(values)}

        def collect() -> None:
            pending = list(refs)
            try:
                _report_cached(dict(values), len(units), on_done)
                while pending:
                    if stop.is_set() or (should_stop and should_stop()):
                        raise RunCancelled()
                    ready, pending = ray.wait(pending, num_returns=1, timeout=WAIT_POLL_S)
                    for ref in ready:
                        value, (node, pid, t0, t1) = ray.get(ref)
                        key = refs[ref]
                        self.telemetry.records.append(UnitRecord(key, node, pid, t0, t1))
                        if store is not None:
                            store.put(key, value)
                        values[key] = value
                        state["finished"] += 1
                        if on_done:
                            on_done(key, value, state["finished"], len(units))
            except BaseException as exc:  # noqa: BLE001 - handed to wait()
                state["error"] = exc
                for ref in pending:
                    ray.cancel(ref, force=True)

        thread = threading.Thread(target=collect, name="dowsing-ray-collect", daemon=True)
        thread.start()

        def wait() -> dict:
            try:
                while thread.is_alive():
                    thread.join(WAIT_POLL_S)
            except BaseException:
                stop.set()
                thread.join()
                raise
            if state["error"] is not None:
                raise state["error"]
            return {u.key: values[u.key] for u in units}

        def cancel() -> None:
            stop.set()
            thread.join()

        return _Pending(wait, cancel)

    def run(self, fn, units, shared, store=None, on_done=None, should_stop=None) -> dict:
        return self.start(fn, units, shared, store, on_done, should_stop).wait()

    def shutdown(self) -> None:
        """Drop the payloads from the object store; a Ray this process started
        stops with it."""
        self._refs.clear()


def _identity(payload):
    return payload


def cli_arguments(config: ExecutorConfig) -> list:
    """The command-line flags that ask `python -m dowsing ...` for this executor."""
    if config.kind == "local":
        return []
    args = ["--executor", "ray"]
    if config.address:
        args += ["--ray-address", config.address]
    if config.num_cpus:
        args += ["--ray-cpus", str(config.num_cpus)]
    return args


def describe_in_subprocess(config: ExecutorConfig, timeout_s: float = 180.0) -> dict:
    """CPUs, GPUs and nodes the executor would run on, found by
    `python -m dowsing cluster` in a child process (so the app never starts
    or joins Ray itself). ValueError with one line when it cannot say."""
    import json
    import subprocess
    import sys

    from ..paths import REPO_ROOT

    if config.kind == "local":
        return LocalExecutor(config).describe()
    try:
        proc = subprocess.run([sys.executable, "-m", "dowsing", "cluster", *cli_arguments(config)], cwd=str(REPO_ROOT),
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ValueError(f"no answer from Ray within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
        raise ValueError(lines[-1][len("error: "):] if lines else f"python -m dowsing cluster exited {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def execution_text(execution: dict, timings: dict) -> str:
    """One line on where a run's units ran: 'Ran in one process: 175 fine-tunes
    in 1839 s.' or 'Ran on Ray (2 nodes, 4 CPU, 0 GPU): 175 fine-tunes, 12
    reused from an interrupted run, 1839 s of fine-tuning in 640 s.'"""
    total = timings.get("total")
    if not execution:
        return f"Total {total:.0f} s." if total else ""
    units = execution.get("units", 0)
    cached = execution.get("cached_units", 0)
    work = timings.get("ground_truth", 0.0) + timings.get("learning_curves", 0.0)
    reused = f", {cached} reused from an interrupted run" if cached else ""
    if execution.get("executor", {}).get("kind") != "ray":
        return f"Ran in one process: {units} fine-tunes{reused}, {work:.0f} s of fine-tuning; total {total:.0f} s."
    res = execution.get("resources", {})
    return (f"Ran on Ray ({res.get('nodes')} node(s), {res.get('CPU')} CPU, {res.get('GPU')} GPU): {units} fine-tunes"
            f"{reused}, {work:.0f} s of fine-tuning in {timings.get('units_wall', 0.0):.0f} s beside the estimators; "
            f"total {total:.0f} s.")


def make_executor(config: ExecutorConfig | None = None, device: str = "cpu"):
    config = config or ExecutorConfig()
    if config.kind == "ray":
        return RayExecutor(config, device)
    return LocalExecutor(config)
