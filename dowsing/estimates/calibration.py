"""The machine's speed constants for the estimate before a run
(`estimate`): a short calibration on the actual model (`calibrate`) that
measures the seconds per token of the forward pass over a few facts and
of the LM-head derivatives, the memory of the per-token curvature
coefficients' double backward (the fallback route's), one
fine-tune step of the last block and single-fact gradients of it,
float32/float64 matrix rates, the bootstrap's per-curve cost, and the
memory the process holds before and after loading and needs on top per
token for those passes. A few seconds, cached as JSON per model
fingerprint, device, dtype and torch threads under cache/estimates/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..costs import CALIBRATION_DOMAINS, tail_work
from ..paths import cache_dir

CALIBRATION_VERSION = 2


# --- the calibration -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """What one short measurement on the model found, and the model's shape.

    Seconds are wall time on this machine at `threads` torch threads; bytes
    are resident memory on the CPU (allocated GPU memory on cuda).
    tail_s_per_param_token: one fine-tune step of the last block divided by
    the parameters it multiplies per token (`tail_work`) and its padded tokens.
    grad_call_s: what a single-fact gradient costs beyond its tokens and
    flattening (Python, small matrices): the alignment estimators pay it per
    fact. vector_s_per_element: one elementwise pass with a float64 sum over
    a float32 vector, per element: the estimators that flatten gradients of
    millions of parameters pay it per gradient (dot products, Adam's
    preconditioner, finite differences). copy_s: a tail copy of the model
    (a deep copy of it, then its last blocks): every estimator family that
    trains or differentiates the last blocks makes one.
    line_s_per_token: the LM-head derivatives of the benchmark's subspace
    terms (one head product per token plus its derivatives along
    CALIBRATION_DOMAINS directions). start_s: the interpreter's start-up and
    imports before a run loads its model. load_average: the machine's
    one-minute load average when it was measured."""

    model: str
    fingerprint: str
    device: str
    dtype: str
    threads: int
    n_params: int
    n_layers: int
    d_model: int
    d_ff: int
    vocab: int
    max_positions: int
    block_params: int
    head_params: int
    linear_shapes: tuple
    dtype_bytes: int
    start_s: float
    load_s: float
    forward_s_per_token: float
    line_s_per_token: float
    tail_s_per_param_token: float
    grad_call_s: float
    vector_s_per_element: float
    copy_s: float
    matmul_flops: float
    matmul32_flops: float
    factor_flops: float
    substitution_size: int
    substitution_1_s: float
    substitution_32_s: float
    bootstrap_s_per_curve: float
    leaderboard_s_per_resample: float
    base_bytes: int
    model_bytes: int
    forward_bytes_per_token: float
    coef_bytes_per_token: float
    step_bytes_per_token: float
    seconds: float
    created_at: str
    load_average: float = 0.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["linear_shapes"] = [list(s) for s in self.linear_shapes]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        data = dict(data)
        data["linear_shapes"] = tuple(tuple(s) for s in data["linear_shapes"])
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def calibration_path(fingerprint: str, device: str, dtype: str, threads: int) -> Path:
    key = hashlib.sha256(f"{fingerprint}|{device}|{dtype}|{threads}|v{CALIBRATION_VERSION}".encode()).hexdigest()
    return cache_dir() / "estimates" / f"{key[:32]}.json"


def cached_calibration(model_id, device: str, dtype: str, threads: int) -> Calibration | None:
    """The stored calibration of this model, device, dtype and thread count,
    or None. A bad model id or path raises the loader's ModelError."""
    from ..pipelines.analysis import model_fingerprint

    path = calibration_path(model_fingerprint(model_id), device, dtype, threads)
    try:
        return Calibration.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def calibrate(model_id=None, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
              use_cache: bool = True):
    """(Calibration, LoadedModel or None): the cached calibration, or a new one
    measured on the model loaded here (then returned too, for its tokenizer).
    threads: torch threads to measure at (None: the current setting)."""
    import torch

    from ..pipelines.analysis import model_fingerprint
    from ..access.models import load_model
    from ..paths import atomic_write_text

    threads = int(threads or torch.get_num_threads())
    if use_cache:
        found = cached_calibration(model_id, device, dtype, threads)
        if found is not None:
            return found, None
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_average = current_load_average()  # before this process adds its own work to it
    try:
        _import_run_modules()
        start_s = _process_age_s()
        base = _current_bytes(device)
        t0 = time.perf_counter()
        loaded = load_model(model_id, device, dtype)
        _touch(loaded.model)
        load_s = time.perf_counter() - t0
        model_bytes = max(_current_bytes(device) - base, 0)
        calibration = dataclasses.replace(measure(loaded, threads, load_s, base if device == "cpu" else 0,
                                                  model_bytes, model_fingerprint(model_id), start_s),
                                          load_average=load_average)
    finally:
        torch.set_num_threads(saved_threads)
    path = calibration_path(calibration.fingerprint, device, dtype, threads)
    atomic_write_text(path, json.dumps(calibration.to_dict(), indent=2))
    return calibration, loaded


def _touch(net) -> None:
    """Read every weight once. A loader may map the weights file and read it
    only when the first pass touches it; a run pays that in its first
    forward pass, which the calibration's repeated probes would hide."""
    import torch

    with torch.no_grad():
        for param in net.parameters():
            param.sum()


def _process_age_s() -> float:
    """Seconds since this process started (the interpreter's start-up and
    imports when called early): /proc/self/stat's start time against
    /proc/uptime; 0 where they cannot be read."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - started / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


def _import_run_modules() -> None:
    # A run imports these before it loads the model; so does the calibration,
    # so the memory it finds before loading is a run's.
    import transformers  # noqa: F401

    from ..pipelines import analysis  # noqa: F401
    from ..validation import benchmark  # noqa: F401


def default_threads() -> int:
    """The torch threads a run started now would use."""
    import torch

    return int(torch.get_num_threads())


def calibration_in_subprocess(model_id, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                              timeout_s: float = 600.0) -> Calibration:
    """The calibration, measured in a fresh child process when it is not
    cached (so the caller's own memory, threads and imports do not enter it:
    the app's). ValueError with one line when it fails."""
    import subprocess
    import sys

    from ..paths import REPO_ROOT

    threads = int(threads or default_threads())
    found = cached_calibration(model_id, device, dtype, threads)
    if found is not None:
        return found
    code = ("import sys; from dowsing.estimates.calibration import calibrate; "
            "calibrate(sys.argv[1] or None, sys.argv[2], sys.argv[3], int(sys.argv[4]))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, model_id or "", device, dtype, str(threads)],
                              cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ValueError(f"the calibration took more than {timeout_s:.0f} s") from exc
    found = cached_calibration(model_id, device, dtype, threads)
    if proc.returncode != 0 or found is None:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise ValueError(lines[-1] if lines else f"the calibration exited {proc.returncode}")
    return found


# --- measuring ---------------------------------------------------------------------------------------------------

def _proc_status_bytes(field_name: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    return _proc_status_bytes("VmRSS")


class _Meter:
    """Seconds and the peak memory above the start of a block of work. On the
    CPU the kernel's high-water mark is reset first (/proc/self/clear_refs);
    where it cannot be, the peak counts only when it exceeds the old one."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0
        self.extra_bytes = 0

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> "_Meter":
        self._sync()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        self._start_bytes = _current_bytes(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        if self.device == "cuda":
            import torch

            peak = int(torch.cuda.max_memory_allocated())
        else:
            peak = _proc_status_bytes("VmHWM")
        self.extra_bytes = max(peak - self._start_bytes, 0)


def model_shape(net) -> dict:
    """Parameter counts and sizes of a causal LM: blocks, d_model, d_ff,
    vocabulary, the LM head's matrix and the (in, out) of one block's linear
    layers."""
    import torch

    from ..kernels.alignment import blocks_of
    from ..kernels.subspace import find_anatomy

    anatomy = find_anatomy(net)
    blocks = list(blocks_of(net))
    head = anatomy.lm_head.weight
    shapes = []
    for module in blocks[-1].modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear):
            shapes.append((int(weight.shape[1]), int(weight.shape[0])))
        elif type(module).__name__ == "Conv1D":
            shapes.append((int(weight.shape[0]), int(weight.shape[1])))
    unique = {id(p): p for p in net.parameters()}.values()
    return {"n_params": int(sum(p.numel() for p in unique)), "n_layers": len(blocks),
            "d_model": anatomy.d_model, "d_ff": anatomy.d_ff, "vocab": int(head.shape[0]),
            "max_positions": anatomy.max_positions,
            "block_params": int(sum(p.numel() for p in blocks[-1].parameters())),
            "head_params": int(head.numel()), "linear_shapes": tuple(shapes),
            "dtype_bytes": int(head.element_size())}


def calibration_facts() -> list:
    """The calibration's facts: the first four of each shipped default domain
    (fixed, so a calibration depends on the model only)."""
    from ..domains import default_domains

    return [f for d in default_domains() for f in d.facts[:4]]


def _timed(meter_device: str, fn, repeats: int = 2) -> _Meter:
    """The fastest of `repeats` runs and the largest extra memory any took.
    The fastest, because other work on shared cores only ever slows a run
    and a cached calibration should not keep a passing disturbance; the
    first run also pays for warming caches and allocators."""
    best = None
    for _ in range(repeats):
        meter = _Meter(meter_device)
        with meter:
            fn()
        if best is None or meter.seconds < best.seconds:
            meter.extra_bytes = max(meter.extra_bytes, best.extra_bytes if best else 0)
            best = meter
        else:
            best.extra_bytes = max(best.extra_bytes, meter.extra_bytes)
    return best


def _probe_forward(loaded, device: str) -> dict:
    """One forward pass (the analysis' and the benchmark's) over the
    calibration facts, keeping the last block's input; the per-token tensors
    the other probes use."""
    from ..kernels.alignment import block_inputs_by_fact, capture_inputs_during
    from ..kernels.forward import forward_pass
    from ..kernels.subspace import encode_facts, find_anatomy, make_batches

    net = loaded.model
    anatomy = find_anatomy(net)
    encoded = encode_facts(loaded.tokenizer, calibration_facts(), anatomy.max_positions)
    batches = make_batches(encoded, len(encoded.ids), next(net.parameters()).device)
    groups = [i % CALIBRATION_DOMAINS for i in range(len(encoded.ids))]
    out = {}

    def run():
        captured: list = []
        with capture_inputs_during(net, len(anatomy.down_projs) - 1, captured):
            out["directions"], _, out["tokens"] = forward_pass(net, anatomy, batches, groups, CALIBRATION_DOMAINS)
        out["block_inputs"] = block_inputs_by_fact(batches, captured)

    meter = _timed(device, run)
    padded = sum(int(ids.numel()) for ids, _, _ in batches)
    # The batch's logits are held at once, so they bound the extra memory from below; on a small model the
    # allocator reuses freed pages and the resident size may not grow at all.
    first = next(net.parameters())
    logits_bytes = net.get_output_embeddings().weight.shape[0] * first.element_size()
    return {**out, "anatomy": anatomy, "ids": encoded.ids, "forward_s_per_token": meter.seconds / padded,
            "forward_bytes_per_token": max(meter.extra_bytes / padded, float(logits_bytes))}


def _probe_coefficients(probe: dict, device: str) -> dict:
    """The memory of tail_coefficients (the per-domain double backprop
    through the final norm and LM head, the analysis' fallback; its chunk's
    working set also bounds the closed-form pass's) and the seconds of the
    LM-head derivatives along several directions at once (the analysis'
    coefficients of every domain and the benchmark's subspace terms)."""
    from ..kernels.curvature import tail_coefficients
    from ..kernels.subspace_terms import LogitLine, derivatives_at_zero

    tokens, anatomy = probe["tokens"], probe["anatomy"]
    v = probe["directions"][0].to(tokens.h.dtype)
    n = int(tokens.h.shape[0])
    coef = _timed(device, lambda: tail_coefficients(anatomy, tokens.h, tokens.targets, v, "hessian"))
    line = _timed(device, lambda: derivatives_at_zero(LogitLine(anatomy, tokens.h), probe["directions"],
                                                      tokens.targets), repeats=1)
    return {"coef_bytes_per_token": coef.extra_bytes / n, "line_s_per_token": line.seconds / n}


def _probe_tail(loaded, probe: dict, device: str, shape) -> dict:
    """Two fine-tune steps of the last block (TailTrainer, AdamW, every
    calibration fact in each minibatch), and single-fact gradients of it."""
    import torch

    from ..kernels.alignment import tail_grad_fn, tail_model, tail_parameters
    from ..kernels.training import Recipe, TailData, TailTrainer

    ids, inputs = probe["ids"], probe["block_inputs"]
    rows = list(range(len(ids)))
    t0 = time.perf_counter()
    work, _ = tail_model(loaded.model, len(probe["anatomy"].down_projs) - 1)
    copy_s = time.perf_counter() - t0
    data = TailData(list(ids), [b.detach().clone() for b in inputs], [rows], [rows],
                    probe["tokens"].fact_losses.detach().cpu().clone())
    trainer = TailTrainer.from_parts(work, data)
    steps = 2
    recipe = Recipe("calibration", "adamw", lr=1e-6, steps=steps, blocks=1, batch=len(rows))
    step = _timed(device, lambda: trainer.train(recipe, 0, rows))
    padded = len(rows) * max(len(r) for r in ids)
    per_param_token = step.seconds / steps / (padded * tail_work(shape, 1, 1))
    params = tail_parameters(trainer.work, 1)
    grad_of = tail_grad_fn(trainer.work, trainer.embed, ids, data.block_inputs, params)
    singles = rows[:4]

    def single_grads():
        for r in singles:
            torch.cat([g.reshape(-1) for g in grad_of([r])])

    single = _timed(device, single_grads)
    # as long as the flattened gradient of four blocks (the alignment's default), so the probe is bound by
    # memory as theirs are, not by a cache that a short vector fits in
    vector = torch.randn(min(max(4 * shape.block_params, 1 << 22), 1 << 26), device=trainer.device)
    elementwise = _timed(device, lambda: (vector * vector).sum(dtype=torch.float64), repeats=3)
    vector_s = elementwise.seconds / vector.numel()
    token_part = sum(per_param_token * len(ids[r]) * tail_work(shape, 1, 1) for r in singles)
    flatten_part = len(singles) * shape.block_params * vector_s
    trainer.reset()
    return {"tail_s_per_param_token": per_param_token, "copy_s": copy_s,
            "grad_call_s": max(single.seconds - token_part - flatten_part, 0.0) / len(singles),
            "vector_s_per_element": vector_s, "step_bytes_per_token": step.extra_bytes / padded}


def _probe_rates(device: str, d_ff: int) -> dict:
    """float64 and float32 matrix-product rates and the float64 Cholesky
    rate (FLOP/s) at the subspace's size (capped, so a large d_ff does not
    make the calibration long), the triangular solves with a factor of that
    size for 1 and 32 right-hand sides, the bootstrap's cost per resampled curve
    (with its power-law fit) on synthetic kernels, and the benchmark
    leaderboard's per resample of 27 domains (two rank correlations)."""
    import numpy as np
    import torch

    from ..kernels.saturation import n_grid
    from ..kernels.uncertainty import DomainKernels, bootstrap_domains
    from ..validation.correlations import domain_bootstrap

    d = max(min(d_ff, 1536), 64)
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(512, d, generator=gen, dtype=torch.float64).to(device)
    x32 = x64.to(torch.float32)
    mm64 = _timed(device, lambda: x64.T @ x64)
    mm32 = _timed(device, lambda: x32.T @ x32)
    spd = x64.T @ x64 / 512 + torch.eye(d, dtype=torch.float64, device=device)
    chol = _timed(device, lambda: torch.linalg.cholesky(spd))
    factor = torch.linalg.lu_factor(spd)
    one, many = x64[0].unsqueeze(-1).contiguous(), x64[:32].T.contiguous()
    subst_1 = _timed(device, lambda: torch.linalg.lu_solve(*factor, one), repeats=3)
    subst_32 = _timed(device, lambda: torch.linalg.lu_solve(*factor, many), repeats=3)
    n_k, resamples = 20, 200
    grid = n_grid(n_k, 24, 1000.0)
    a = np.random.default_rng(0).standard_normal((n_k, n_k))
    kernels = np.stack([(a @ a.T) / (1.0 + n / n_k) for n in grid])
    boot = _timed("cpu", lambda: bootstrap_domains([DomainKernels("a", n_k, grid, kernels)] * 2, resamples))
    scores = np.random.default_rng(1).standard_normal((3, 27))
    board = _timed("cpu", lambda: domain_bootstrap(scores[0], scores[1], scores[2], resamples))
    return {"matmul_flops": 2.0 * 512 * d * d / max(mm64.seconds, 1e-6),
            "matmul32_flops": 2.0 * 512 * d * d / max(mm32.seconds, 1e-6),
            "factor_flops": d ** 3 / 3.0 / max(chol.seconds, 1e-6), "substitution_size": d,
            "substitution_1_s": subst_1.seconds, "substitution_32_s": subst_32.seconds,
            "bootstrap_s_per_curve": boot.seconds / (2 * resamples),
            "leaderboard_s_per_resample": board.seconds / resamples}


def measure(loaded, threads: int, load_s: float, base_bytes: int, model_bytes: int, fingerprint: str,
            start_s: float = 0.0) -> Calibration:
    """Run every probe on a loaded model (a few seconds) and collect them."""
    from datetime import datetime, timezone

    import torch

    t0 = time.perf_counter()
    info = loaded.info
    shape = model_shape(loaded.model)
    holder = type("Shape", (), shape)
    with torch.enable_grad():
        probe = _probe_forward(loaded, info.device)
        coefficients = _probe_coefficients(probe, info.device)
        tail = _probe_tail(loaded, probe, info.device, holder)
    rates = _probe_rates(info.device, shape["d_ff"])
    return Calibration(
        model=info.id, fingerprint=fingerprint, device=info.device, dtype=info.dtype, threads=threads, **shape,
        start_s=start_s, load_s=load_s, forward_s_per_token=probe["forward_s_per_token"], **coefficients, **tail,
        **rates,
        base_bytes=int(base_bytes), model_bytes=int(model_bytes) or shape["n_params"] * shape["dtype_bytes"],
        forward_bytes_per_token=probe["forward_bytes_per_token"], seconds=time.perf_counter() - t0,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), load_average=current_load_average())


def current_load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0
