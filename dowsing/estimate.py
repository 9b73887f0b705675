"""What a run will cost before it starts: wall time on this machine and peak
memory (the process's resident memory on the CPU, allocated GPU memory with
device cuda) for an analysis, a benchmark, a validation or a plan's pilots.

Two parts:

* A short calibration on the actual model (`calibrate`): the seconds per
  token of the forward pass over a few facts, of the per-token curvature
  coefficients and of the LM-head derivatives, one fine-tune step of the last
  block and single-fact gradients of it, float32/float64 matrix rates, the
  bootstrap's per-curve cost, and the memory the process holds before and
  after loading and needs on top per token for those passes. A few seconds,
  cached as JSON per model fingerprint, device, dtype and torch threads under
  cache/estimates/.
* Pure cost functions (`analysis_cost`, `benchmark_cost`, `validation_cost`,
  `plan_cost`)
  that scale those rates by what the run does: tokens, facts, domains,
  fine-tunes, gradients, parameters and the copies each stage holds.

Time of a pass through the last blocks is proportional to the parameters it
multiplies per token: the LM head (vocab x d_model) and each kept block
forward, the head's input gradient and twice each trained block backward.
One measured step fixes the seconds per parameter-token; the shapes do the
rest. Everything here predicts; nothing runs the analysis.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .paths import cache_dir

CALIBRATION_VERSION = 1
COEF_CHUNK = 512  # tail_coefficients' chunk of tokens (curvature.py)
LINE_CHUNK = 256  # derivatives_at_zero's chunk (subspace_terms.py)
CALIBRATION_DOMAINS = 4  # directions of the calibration's LM-head derivatives
ADAM_BATCH = 8  # facts per minibatch of Adam's second moment (ranking.ADAM_BATCH_SIZE, the benchmark's)
GRAD_CHUNK = 16  # facts per batched gradient (alignment's sum_batch, trajectory's chunk)
EKFAC_BATCH = 8  # kronfluence's per-device batch (estimators.ekfac)
RAY_STARTUP_S = 6.4  # ray.init and the first task on this machine (docs/PERFORMANCE.md)


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
    coef_s_per_token: float
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
    from .analysis import model_fingerprint

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

    from .analysis import model_fingerprint
    from .models import atomic_write_text, load_model

    threads = int(threads or torch.get_num_threads())
    if use_cache:
        found = cached_calibration(model_id, device, dtype, threads)
        if found is not None:
            return found, None
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    load_average = _load_average()  # before this process adds its own work to it
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

    from . import analysis  # noqa: F401
    from .validation import benchmark  # noqa: F401


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

    from .paths import REPO_ROOT

    threads = int(threads or default_threads())
    found = cached_calibration(model_id, device, dtype, threads)
    if found is not None:
        return found
    code = ("import sys; from dowsing.estimate import calibrate; "
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

    from .alignment import blocks_of
    from .subspace import find_anatomy

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
    from .domains import default_domains

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
    from .alignment import block_inputs_by_fact, capture_inputs_during
    from .forward import forward_pass
    from .subspace import encode_facts, find_anatomy, make_batches

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
    """tail_coefficients (the analysis' per-domain curvature, double backprop
    through the final norm and LM head) and the LM-head derivatives along
    several directions at once (the benchmark's subspace terms)."""
    from .curvature import tail_coefficients
    from .subspace_terms import LogitLine, derivatives_at_zero

    tokens, anatomy = probe["tokens"], probe["anatomy"]
    v = probe["directions"][0].to(tokens.h.dtype)
    n = int(tokens.h.shape[0])
    coef = _timed(device, lambda: tail_coefficients(anatomy, tokens.h, tokens.targets, v, "hessian"))
    line = _timed(device, lambda: derivatives_at_zero(LogitLine(anatomy, tokens.h), probe["directions"],
                                                      tokens.targets), repeats=1)
    return {"coef_s_per_token": coef.seconds / n, "coef_bytes_per_token": coef.extra_bytes / n,
            "line_s_per_token": line.seconds / n}


def tail_work(shape, keep: int, trained: int) -> float:
    """Parameters a pass through the last `keep` blocks multiplies per token:
    forward through them and the LM head; with `trained` > 0 blocks trained,
    backward through the head (its input gradient) and, twice (input and
    weight gradients), through the trained blocks."""
    work = shape.head_params + keep * shape.block_params
    if trained:
        work += shape.head_params + 2 * trained * shape.block_params
    return float(work)


def _probe_tail(loaded, probe: dict, device: str, shape) -> dict:
    """Two fine-tune steps of the last block (TailTrainer, AdamW, every
    calibration fact in each minibatch), and single-fact gradients of it."""
    import torch

    from .alignment import tail_grad_fn, tail_model, tail_parameters
    from .training import Recipe, TailData, TailTrainer

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

    from .saturation import n_grid
    from .uncertainty import DomainKernels, bootstrap_domains
    from .validation.correlations import domain_bootstrap

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
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), load_average=_load_average())


# --- counting ----------------------------------------------------------------------------------------------------

def token_lengths(tokenizer, facts, max_positions: int) -> list:
    """Tokens per fact as the engine encodes them (cut to the context)."""
    return [min(len(tokenizer(f)["input_ids"]), max_positions) for f in facts]


def predicted_tokens(lengths) -> int:
    """Positions with a next-token target: sum of (T_i - 1)."""
    return int(sum(max(n - 1, 0) for n in lengths))


def padded_tokens(lengths, batch_size: int) -> int:
    """Tokens the model processes in right-padded batches of `batch_size`
    facts taken in order: sum over batches of (facts x longest fact)."""
    lengths = list(lengths)
    return int(sum(len(lengths[i: i + batch_size]) * max(lengths[i: i + batch_size])
                   for i in range(0, len(lengths), batch_size)))


def expected_longest(lengths, k: int) -> float:
    """E[longest of k facts drawn without replacement]: with the lengths
    sorted, the i-th (1-based) is the longest with probability
    (C(i-1, k-1)) / C(n, k)."""
    ordered = sorted(lengths)
    n = len(ordered)
    k = min(k, n)
    if k <= 0:
        return 0.0
    total = math.comb(n, k)
    return float(sum(length * math.comb(i, k - 1) for i, length in enumerate(ordered)) / total)


def expected_padded(lengths, k: int) -> float:
    """Padded tokens of a random minibatch of k of these facts."""
    return min(k, len(lengths)) * expected_longest(lengths, k)


def chunked(lengths, chunk: int = GRAD_CHUNK) -> tuple:
    """(calls, padded tokens) of a pass over these facts in chunks of `chunk`."""
    lengths = list(lengths)
    return math.ceil(len(lengths) / chunk), padded_tokens(lengths, chunk)


# --- the estimate ------------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """What a run is predicted to cost on this machine.

    stages_s: predicted wall seconds per stage, in run order (stages that run
    beside others on Ray count only what they add). memory_bytes: the
    predicted peak of each stage (resident memory on the CPU, allocated GPU
    memory on cuda); the run's peak is their maximum. basis: what the
    numbers rest on; notes: what they leave out."""

    kind: str
    stages_s: dict
    memory_bytes: dict
    device: str
    basis: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return float(sum(self.stages_s.values()))

    @property
    def peak_bytes(self) -> int:
        return int(max(self.memory_bytes.values())) if self.memory_bytes else 0

    @property
    def peak_stage(self) -> str:
        return max(self.memory_bytes, key=self.memory_bytes.get) if self.memory_bytes else ""

    @property
    def memory_kind(self) -> str:
        return "GPU memory" if self.device == "cuda" else "resident memory (RSS)"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "total_s": self.total_s, "stages_s": dict(self.stages_s),
                "peak_bytes": self.peak_bytes, "peak_stage": self.peak_stage,
                "memory_bytes": {k: int(v) for k, v in self.memory_bytes.items()}, "device": self.device,
                "memory_kind": self.memory_kind, "basis": list(self.basis), "notes": list(self.notes)}


def available_memory_bytes(device: str = "cpu") -> int | None:
    """What this machine has free for a run: MemAvailable of /proc/meminfo
    (capped by a cgroup limit when there is one), or the free memory of the
    current GPU. None when it cannot be read."""
    if device == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0])
        except (RuntimeError, AssertionError):
            return None
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit.isdigit() and available is not None:
            available = min(available, int(limit) - usage)
    except (OSError, ValueError):
        pass
    return available


def memory_refusal(estimate: Estimate, available_bytes: int | None) -> str | None:
    """One line refusing the run when its predicted peak exceeds what the
    machine has available (None when it fits, or the memory is unknown)."""
    if available_bytes is None or estimate.peak_bytes <= available_bytes:
        return None
    return (f"The predicted peak {estimate.memory_kind} ({format_bytes(estimate.peak_bytes)}, during "
            f"{estimate.peak_stage}) exceeds the {format_bytes(available_bytes)} this machine has available, so "
            "the run is refused. Use fewer or shorter facts, fewer domains or a smaller model.")


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0


def load_note() -> str | None:
    """A line on other work sharing the cores now, or None when the machine
    is quiet: the estimate assumes the quiet machine the calibration saw."""
    load = _load_average()
    cores = os.cpu_count() or 1
    if load < 0.5 * cores:
        return None
    return (f"The machine is busy now (load average {load:.1f} on {cores} cores): other work shares the cores, so "
            "the run will likely take longer than estimated.")


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def format_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def format_estimate(estimate: Estimate, available_bytes: int | None) -> str:
    """The estimate as text: total time and peak memory, the machine's
    available memory, the stages, and what it rests on (the warning of
    `memory_refusal` is separate)."""
    lines = [f"Estimated {estimate.kind}: {format_seconds(estimate.total_s)} wall time on this machine, "
             f"peak {estimate.memory_kind} {format_bytes(estimate.peak_bytes)} (during {estimate.peak_stage}).",
             "Available memory: " + (format_bytes(available_bytes) if available_bytes is not None else "unknown") + "."]
    lines.append("Stages:")
    width = max(len(name) for name in estimate.stages_s)
    for name, seconds in estimate.stages_s.items():
        lines.append(f"  {name.ljust(width)}  {format_seconds(seconds):>8}  "
                     f"peak {format_bytes(estimate.memory_bytes.get(name, 0))}")
    lines += ["Rests on:"] + [f"  - {b}" for b in estimate.basis]
    lines += [f"  note: {n}" for n in estimate.notes]
    return "\n".join(lines)


# --- cost of the pieces (pure) -----------------------------------------------------------------------------------

def tail_pass_s(cal: Calibration, padded: float, keep: int, trained: int = 0) -> float:
    """A pass over `padded` tokens through the last `keep` blocks and the LM
    head, backward through `trained` of them when > 0 (`tail_work`)."""
    return cal.tail_s_per_param_token * padded * tail_work(cal, keep, trained)


def gradients_s(cal: Calibration, calls: int, padded: float, keep: int, trained: int,
                vector_ops: float = 0.0) -> float:
    """`calls` gradient computations over `padded` tokens in all, each paying
    the fixed per-call cost and `vector_ops` elementwise passes over the
    trained parameters (flattening, dot products)."""
    vectors = calls * vector_ops * trainable_params(cal, trained) * cal.vector_s_per_element
    return calls * cal.grad_call_s + tail_pass_s(cal, padded, keep, trained) + vectors


def finetune_s(cal: Calibration, steps: int, step_padded: float, keep: int, trained: int,
               eval_padded: float) -> float:
    """One fine-tune of the last blocks: `steps` optimizer steps of
    `step_padded` tokens each, and a forward over `eval_padded` tokens to read
    the held-out losses."""
    return steps * tail_pass_s(cal, step_padded, keep, trained) + tail_pass_s(cal, eval_padded, keep)


def matmul_s(cal: Calibration, flops: float, dtype_bits: int = 64) -> float:
    return flops / (cal.matmul_flops if dtype_bits == 64 else cal.matmul32_flops)


def hessian_s(cal: Calibration, tokens: float) -> float:
    """H = X^T diag(w c) X over `tokens` rows of X (d_ff wide), float64."""
    return matmul_s(cal, 2.0 * tokens * cal.d_ff ** 2)


def substitution_s(cal: Calibration, size: int, rhs: int = 1) -> float:
    """The two triangular solves with a factored size x size float64 matrix:
    they read the whole factor (bound by memory, not arithmetic), so they
    scale with size^2, measured at the calibration's size for 1 and for 32
    right-hand sides."""
    per_rhs = max(cal.substitution_32_s - cal.substitution_1_s, 0.0) / 31.0
    return (cal.substitution_1_s + per_rhs * (rhs - 1)) * (size / cal.substitution_size) ** 2


def solve_s(cal: Calibration, size: int, rhs: int = 1, lu: bool = False) -> float:
    """A dense float64 solve of a size x size system: Cholesky (n^3/3) or LU
    (2n^3/3), then the substitutions."""
    return (size ** 3 / (1.5 if lu else 3.0)) / cal.factor_flops + substitution_s(cal, size, rhs)


def trainable_params(cal: Calibration, blocks: int) -> int:
    return min(blocks, cal.n_layers) * cal.block_params


def tail_params(cal: Calibration, keep: int) -> int:
    """A tail copy of the model: everything but the blocks before the last `keep`."""
    return cal.n_params - (cal.n_layers - min(keep, cal.n_layers)) * cal.block_params


# --- the analysis ------------------------------------------------------------------------------------------------

def analysis_route(config) -> str:
    """The analysis' route as `analysis.choose_route` picks it for a model
    whose final norm and head reproduce its logits (the usual case)."""
    if config.solver == "auto":
        return "structured" if config.blocks == 1 else "exact"
    return config.solver


def _grid_points(n_k: int, config) -> int:
    from .saturation import n_grid

    return len(n_grid(n_k, config.saturation_points, config.saturation_max_factor))


def structured_domain_s(cal: Calibration, n_tokens: int, r: int, m_k: int, points: int) -> tuple:
    """(solve, saturation, kernels) seconds of one domain on the structured
    route: the curvature coefficients of every token, H = X^T diag X
    (float64), the dense solve, and the saturation system (Woodbury with
    rank r = the domain's tokens when r < d_ff, else dense) solved at every
    grid point for mu(n) and, with the domain's m_k facts as right-hand
    sides, for the bootstrap kernels."""
    d = cal.d_ff
    solve = n_tokens * cal.coef_s_per_token + hessian_s(cal, n_tokens) + solve_s(cal, d)
    if r < d:
        solve += (2.0 * d ** 3 / 3.0) / cal.factor_flops + substitution_s(cal, d, r) + matmul_s(cal, 2.0 * r * r * d)
        point = substitution_s(cal, d) + matmul_s(cal, 4.0 * r * d) + solve_s(cal, r, lu=True)
        kernel = substitution_s(cal, d, m_k) + matmul_s(cal, 4.0 * r * d * m_k + 2.0 * m_k * m_k * d) + solve_s(
            cal, r, rhs=m_k, lu=True)
    else:
        solve += hessian_s(cal, r)
        point = solve_s(cal, d, lu=True)
        kernel = solve_s(cal, d, rhs=m_k, lu=True) + matmul_s(cal, 2.0 * m_k * m_k * d)
    return solve, points * point, points * kernel


def hvp_domain_s(cal: Calibration, padded: float, config, route: str, points: int) -> tuple:
    """(solve, saturation, kernels) seconds of one domain on the
    Hessian-vector-product routes (B blocks, dimension B x d_ff): per-fact
    gradients and the first-order graph cost a forward and a backward over
    every batch; each product one double backward. exact: a dense matrix
    of both systems (2 x dim products) and a dense solve per grid point. cg:
    at most cg_maxiter (else dim) iterations, and with B > 1 one CG run per
    grid point for mu(n), so an upper bound."""
    dim = config.blocks * cal.d_ff
    backward = tail_pass_s(cal, padded, config.blocks, config.blocks) - tail_pass_s(cal, padded, config.blocks)
    first_order = cal.forward_s_per_token * padded + backward
    product = 2.0 * backward
    if route == "exact":
        solve = 3 * first_order + 2 * dim * product + solve_s(cal, dim)
        return solve, points * solve_s(cal, dim, lu=True), points * solve_s(cal, dim, rhs=1, lu=True)
    iterations = min(config.cg_maxiter or dim, dim)
    solve = 2 * first_order + iterations * product
    if config.blocks == 1:
        return solve, points * solve_s(cal, cal.d_ff, lu=True), points * solve_s(cal, cal.d_ff, lu=True)
    return solve, points * iterations * product, 0.0


def analysis_subspace_s(cal: Calibration, lengths: list, config) -> dict:
    """Seconds of the solve, saturation and bootstrap stages over all domains."""
    route = analysis_route(config)
    flat = [n for d in lengths for n in d]
    n_tokens = predicted_tokens(flat)
    padded = padded_tokens(flat, config.batch_size)
    totals = [0.0, 0.0, 0.0]
    for domain in lengths:
        points = _grid_points(len(domain), config)
        if route == "structured":
            parts = structured_domain_s(cal, n_tokens, predicted_tokens(domain), len(domain), points)
        else:
            parts = hvp_domain_s(cal, padded, config, route, points)
        totals = [t + p for t, p in zip(totals, parts)]
    bootstrap = totals[2]
    if route == "structured" or route == "exact" or config.blocks == 1:
        bootstrap += config.bootstrap_resamples * len(lengths) * cal.bootstrap_s_per_curve
    return {"solve": totals[0], "saturation": totals[1], "bootstrap": bootstrap}


# --- estimator families over the last blocks (pure) --------------------------------------------------------------

def adam_moment_s(cal: Calibration, pool: list, batches: int, keep: int, trained: int) -> float:
    """Adam's second moment: `batches` gradients of ADAM_BATCH random facts,
    each squared in float64 and summed."""
    return gradients_s(cal, batches, batches * expected_padded(pool, ADAM_BATCH), keep, trained, vector_ops=3)


def domain_alignment_s(cal: Calibration, rows: list, query: list | None, keep: int, trained: int,
                       preconditioners: int = 1) -> float:
    """`alignment.domain_alignment`: the domain's summed gradient in chunks,
    the query's gradient in one call, and one gradient per fact, each
    flattened and squared, then per preconditioner dotted with itself, the
    domain's sum and the query's (three float64 sums)."""
    calls, padded = chunked(rows)
    per_fact = 2 + preconditioners * (3 if query else 2)
    seconds = gradients_s(cal, calls, padded, keep, trained, vector_ops=2)
    seconds += gradients_s(cal, len(rows), sum(rows), keep, trained, vector_ops=per_fact)
    if query:
        seconds += gradients_s(cal, 1, len(query) * max(query), keep, trained, vector_ops=1 + preconditioners)
    return seconds


def alignment_family_s(cal: Calibration, train: list, held: list | None, adam: bool, adam_batches: int,
                       keep: int, trained: int, plain: bool = True) -> float:
    """The alignment estimators of a benchmark or validation: per domain its
    training facts against each other and (held given) against its held-out
    half, sharing one pass of gradients for every preconditioner asked
    (plain, Adam's); Adam's moment once."""
    pool = [n for d in train for n in d]
    seconds = cal.copy_s + (adam_moment_s(cal, pool, adam_batches, keep, trained) if adam else 0.0)
    for k, rows in enumerate(train):
        seconds += domain_alignment_s(cal, rows, held[k] if held else None, keep, trained, int(adam) + int(plain))
    return seconds


def trajectory_family_s(cal: Calibration, train: list, held: list, names, recipe, keep: int, adam_batches: int,
                        checkpoints: int = 0, all_facts: bool = False, lr_known: bool = True) -> float:
    """The trajectory estimators: recording the baseline fine-tune (or
    loading `checkpoints` of the user's), then Diff-In / TracIn's gradients at
    every step (per domain its training and held-out means, Diff-In's
    central differences two more held-out means; with all_facts per-fact
    gradients too) and the checkpoint pass (a forward, with input gradients
    for VoG, over the scored facts at every checkpoint)."""
    pool = [n for d in train for n in d]
    blocks = min(recipe.blocks, keep)
    if checkpoints:
        seconds, steps = cal.copy_s + checkpoints * cal.load_s, checkpoints - 1
    else:
        steps = recipe.steps
        seconds = cal.copy_s + finetune_s(cal, steps, expected_padded(pool, recipe.batch), keep, blocks, 0)
    if {"diffin", "tracin_ckpt"} & set(names):
        if recipe.optimizer == "adamw":
            seconds += adam_moment_s(cal, pool, adam_batches, keep, blocks)
        means = [chunked(t) for t in train] + [chunked(h) for h in held] * (3 if "diffin" in names else 1)
        if not lr_known:
            means.append(chunked(pool))
        if all_facts:
            means += [chunked(h) for h in held] + [chunked(t) for t in train]
            means += [(len(d), sum(d)) for d in train + held]
        calls, padded = sum(c for c, _ in means), sum(p for _, p in means)
        # per chunk: scaled and summed; per step: the checkpoint entered and its delta; per domain: the step
        # u = P g, its dot products and (Diff-In) the perturbed parameters and the finite difference
        per_domain = 12 if "diffin" in names else 3
        vectors = (4 + per_domain * len(train)) * trainable_params(cal, blocks) * cal.vector_s_per_element
        seconds += steps * (gradients_s(cal, calls, padded, keep, blocks, vector_ops=2) + vectors)
    if {"vog", "ckpt_confidence", "ckpt_variability", "el2n"} & set(names):
        scored = [n for d in (train + held if all_facts else train) for n in d]
        _, padded = chunked(scored)
        seconds += (steps + 1) * tail_pass_s(cal, padded, keep, keep if "vog" in names else 0)
    return seconds


def ekfac_s(cal: Calibration, train: list, held: list, blocks: int, fit_facts: int, keep: int) -> float:
    """EK-FAC through kronfluence over the last `blocks` blocks' linear
    layers: the covariance pass over the fitted facts, the
    eigendecompositions (about 9 n^3 per n x n factor), the eigenvalue
    pass (every fitted fact's gradient rotated into the eigenbases, float32),
    and per domain the gradients of its held-out facts (summed, then
    rotated once) and of its training facts (dotted with that sum)."""
    pool = [n for d in train for n in d]
    fitted = sorted(pool)[: fit_facts] if fit_facts and fit_facts < len(pool) else pool
    fit_padded = (len(fitted) / EKFAC_BATCH) * expected_padded(fitted, EKFAC_BATCH)
    rotation = blocks * sum(2.0 * i * o * (i + o) for i, o in cal.linear_shapes)
    seconds = 2 * cal.copy_s + 2 * gradients_s(cal, math.ceil(len(fitted) / EKFAC_BATCH), fit_padded, keep, blocks)
    seconds += blocks * sum(9.0 * (i ** 3 + o ** 3) for i, o in cal.linear_shapes) / cal.factor_flops
    seconds += matmul_s(cal, len(fitted) * rotation, 32)
    for rows, query in zip(train, held):
        for facts in (rows, query):
            seconds += gradients_s(cal, math.ceil(len(facts) / EKFAC_BATCH), padded_tokens(facts, EKFAC_BATCH),
                                   keep, blocks)
        seconds += matmul_s(cal, rotation, 32)
    return seconds


def airrep_s(cal: Calibration, train: list, held: list, recipe, keep: int) -> float:
    """AirRep's data: 3 folds (at least 2, at most the domains) of 8
    counterfactual fine-tunes of the main recipe adding 4 training facts,
    each read on the held-out facts of the other folds' domains (the
    encoder's own training, a few seconds, is left out); it builds its own
    trainer (a tail copy)."""
    folds = max(2, min(3, len(train)))
    pool = [n for d in train for n in d]
    held_all = [n for d in held for n in d]
    targets = held_all[: round(len(held_all) * (folds - 1) / folds)]
    step = expected_padded(pool, recipe.batch) + expected_padded(pool, min(recipe.added_batch, 4))
    one = finetune_s(cal, recipe.steps, step, keep, min(recipe.blocks, keep), padded_tokens(targets, 16))
    return cal.copy_s + folds * 8 * one


def full_gradient_s(cal: Calibration, rows: list, batch_size: int) -> float:
    """The gradient of a mean loss over every parameter of the model
    (`pilots.mean_loss_gradient`), accumulated over batches of `batch_size`
    facts: the forward pass at its calibrated rate, backward through the LM
    head and every block as a fine-tune step's (`tail_work`), and each
    batch's gradient added to the sum (a pass over every parameter)."""
    calls, padded = math.ceil(len(rows) / batch_size), padded_tokens(rows, batch_size)
    backward = tail_pass_s(cal, padded, cal.n_layers, cal.n_layers) - tail_pass_s(cal, padded, cal.n_layers)
    return cal.forward_s_per_token * padded + backward + calls * cal.n_params * cal.vector_s_per_element


def pilot_family_s(cal: Calibration, train: list, held: list, names, keep: int, sizes=(2, 4, 8),
                   batch_size: int = 16) -> float:
    """The pilot estimators (`estimators.pilot`) over each domain's halves A
    (train) and B (held); a domain whose halves cannot hold two facts each
    costs nothing. pilot_gain / pilot_curve: a trainer (a tail copy, checked
    on 16 facts of B), then per domain and per pilot size n
    (`pilots.pilot_sizes`: the pilot sizes below the smaller half, and its
    whole size; pilot_gain alone: that size only) two runs, A's first n
    facts teaching B and the other way, each PILOT_RECIPE.steps steps of all
    n facts on the last min(PILOT_RECIPE.blocks, keep) blocks and a read of
    the other half. lookahead_sign: per domain the whole model's gradient of
    each half's mean loss, then the two signs and dot products over every
    parameter."""
    from .estimators.pilot import MIN_HALF
    from .pilots import PILOT_RECIPE, pilot_sizes

    names = set(names)
    tuned = bool(names & {"pilot_gain", "pilot_curve"})
    blocks = min(PILOT_RECIPE.blocks, keep)
    seconds = 0.0
    if tuned:
        seconds += cal.copy_s + tail_pass_s(cal, padded_tokens([n for d in held for n in d][:16], 16), keep)
    for a, b in zip(train, held):
        if min(len(a), len(b)) < MIN_HALF:
            continue
        if tuned:
            wanted = sizes if "pilot_curve" in names else (max(len(a), len(b)),)
            for n in pilot_sizes(wanted, len(a), len(b)):
                for taught, read in ((a, b), (b, a)):
                    seconds += finetune_s(cal, PILOT_RECIPE.steps, n * max(taught[:n]), keep, blocks,
                                          padded_tokens(read, 16))
        if "lookahead_sign" in names:
            seconds += full_gradient_s(cal, a, batch_size) + full_gradient_s(cal, b, batch_size)
            seconds += 4 * cal.n_params * cal.vector_s_per_element
    return seconds


def pilot_memory(cal: Calibration, train: list, held: list, keep: int, names, batch_size: int = 16) -> float:
    """Bytes the named pilot estimators add over the halves A (train) and B
    (held): pilot_gain / pilot_curve a trainer (its own copy of the block
    inputs, a tail copy and its starting weights, gradients and AdamW's two
    moments of the trained blocks) and a step over the larger half;
    lookahead_sign, one domain at a time beside it, the whole model's
    gradients of both halves and their signs, and one batch's activations
    kept for the backward pass: the calibrated one-block step's per token
    (the LM head's logits and one block) plus, for each further block,
    about 10 d_model + 4 d_ff values a token."""
    from .pilots import PILOT_RECIPE

    names = set(names)
    b = cal.dtype_bytes
    flat = [n for d in train + held for n in d]
    if not flat:
        return 0.0
    half = max(max(len(d) for d in train + held), 1)
    trainer = step = lookahead = 0.0
    if names & {"pilot_gain", "pilot_curve"}:
        trainer = (sum(flat) * cal.d_model * b + 2 * tail_params(cal, keep) * b
                   + 3 * trainable_params(cal, min(PILOT_RECIPE.blocks, keep)) * b)
        step = cal.step_bytes_per_token * half * max(flat)
    if "lookahead_sign" in names:
        per_token = cal.step_bytes_per_token + (cal.n_layers - 1) * (10 * cal.d_model + 4 * cal.d_ff) * b
        lookahead = 4 * cal.n_params * b + per_token * batch_size * max(flat)
    return trainer + max(step, lookahead)


def in_family(names, family: str) -> list:
    """The names whose registered estimator belongs to `family`."""
    from .estimators import get

    return [name for name in names if get(name).family == family]


def analysis_ranking_s(cal: Calibration, domains: list, config) -> float:
    """The ranking estimator's own work: none for mean loss and the paper's
    (they reuse the forward pass and the solves); for gradient alignment
    the gradients of the last align_blocks blocks (each domain's facts, or
    its two seeded halves against each other); for the checkpoint
    estimators a second forward pass and the trajectory over the user's
    checkpoints. domains: [(name, [tokens per fact])]."""
    from .splitting import split_order
    from .training import Recipe

    name = config.estimator
    lengths = [list(d) for _, d in domains]
    if name in ("mean_loss", "paper"):
        return 0.0
    keep = min(config.align_blocks, cal.n_layers)
    if in_family([name], "trajectory"):
        halves = [split_order(list(d), n, config.seed) for n, d in domains]
        flat = [n for d in lengths for n in d]
        forward = cal.forward_s_per_token * padded_tokens(flat, config.batch_size)
        return forward + trajectory_family_s(
            cal, [a for a, _ in halves], [b for _, b in halves], [name], Recipe("checkpoints", blocks=keep), keep,
            config.adam_batches, checkpoints=len(config.checkpoints), all_facts=True,
            lr_known=config.checkpoint_lr is not None)
    if in_family([name], "pilot"):
        halves = [split_order(list(d), n, config.seed) for n, d in domains]
        return pilot_family_s(cal, [a for a, _ in halves], [b for _, b in halves], [name],
                              analysis_pilot_keep(cal, config), batch_size=config.batch_size)
    pool = [n for d in lengths for n in d]
    seconds = cal.copy_s + (adam_moment_s(cal, pool, config.adam_batches, keep, keep) if name.endswith("_adam")
                            else 0.0)
    for (domain_name, rows) in domains:
        if "heldout" in name:
            half_a, half_b = split_order(list(rows), domain_name, config.seed)
            seconds += domain_alignment_s(cal, half_a, half_b, keep, keep)
            seconds += domain_alignment_s(cal, half_b, half_a, keep, keep)
        else:
            seconds += domain_alignment_s(cal, list(rows), None, keep, keep)
    return seconds


def analysis_pilot_keep(cal: Calibration, config) -> int:
    """The blocks after the analysis' captured block inputs (`ranking.capture_block`):
    the alignment's when the ranking estimator trains on block inputs, the
    pilot recipe's when the diagnosis runs, the more of the two."""
    from .estimators import get
    from .pilots import PILOT_RECIPE

    wanted = [min(config.align_blocks, cal.n_layers)] if "block_inputs" in get(config.estimator).needs else []
    if config.diagnose:
        wanted.append(min(PILOT_RECIPE.blocks, cal.n_layers))
    return max(wanted) if wanted else min(PILOT_RECIPE.blocks, cal.n_layers)


def analysis_diagnosis_s(cal: Calibration, domains: list, config) -> float:
    """The diagnosis (`analysis._diagnosis`, with config.diagnose): the pilot
    gain of every domain on its two seeded halves, unless the ranking
    estimator is the pilot gain and has it already."""
    from .splitting import split_order

    if not config.diagnose or config.estimator == "pilot_gain":
        return 0.0
    halves = [split_order(list(d), n, config.seed) for n, d in domains]
    return pilot_family_s(cal, [a for a, _ in halves], [b for _, b in halves], ["pilot_gain"],
                          analysis_pilot_keep(cal, config), batch_size=config.batch_size)


def analysis_memory(cal: Calibration, lengths: list, config) -> dict:
    """Peak bytes per stage: the process and the weights, the forward pass's
    per-token tensors (d_ff and d_model per predicted token), and on top the
    largest batch's activations (forward), the solve's float64 matrices
    (gradients of every fact, H, its factor, the Woodbury pieces) with the
    larger of a chunk's double backprop and H's float64 copies of X, and the
    alignment's tail copy (a deep copy of the model, then its last blocks)
    with its flattened gradients and one batch's activations."""
    b, d = cal.dtype_bytes, cal.d_ff
    flat = [n for dom in lengths for n in dom]
    n_tokens, facts = predicted_tokens(flat), len(flat)
    resident = cal.base_bytes + max(cal.model_bytes, cal.n_params * b)
    tokens = n_tokens * (d + cal.d_model) * b + n_tokens * 8 * 3
    batch = max(len(flat[i: i + config.batch_size]) * max(flat[i: i + config.batch_size])
                for i in range(0, facts, config.batch_size))
    r = max(predicted_tokens(dom) for dom in lengths)
    system = (facts * d + 4 * d * d + 2 * r * d + r * r) * 8
    if analysis_route(config) != "structured":
        dim = config.blocks * d
        system = (facts * dim + 4 * dim * dim) * 8 + 2 * n_tokens * cal.step_bytes_per_token
    solve_transient = max(cal.coef_bytes_per_token * min(n_tokens, COEF_CHUNK), 2 * n_tokens * d * 8)
    memory = {"load model": resident,
              "forward pass": resident + tokens + cal.forward_bytes_per_token * batch,
              "solve": resident + tokens + system + solve_transient}
    memory["saturation"] = memory["bootstrap"] = resident + tokens + system
    memory["ranking"] = resident + tokens
    inputs = sum(flat) * cal.d_model * b
    if in_family([config.estimator], "pilot") or config.diagnose:
        from .splitting import split_order

        halves = [split_order(list(dom), str(k), config.seed) for k, dom in enumerate(lengths)]
        pilot_keep = analysis_pilot_keep(cal, config)
        for stage, names in (("ranking", [config.estimator]), ("diagnosis", ["pilot_gain"])):
            memory[stage] = resident + tokens + inputs + pilot_memory(
                cal, [a for a, _ in halves], [h for _, h in halves], pilot_keep, names, config.batch_size)
    if config.estimator not in ("mean_loss", "paper") and not in_family([config.estimator], "pilot"):
        keep = min(config.align_blocks, cal.n_layers)
        memory["ranking"] = resident + tokens + inputs + max(
            cal.n_params * b, tail_params(cal, keep) * b + 8 * trainable_params(cal, keep) * 4
            + cal.step_bytes_per_token * batch)
    return {k: int(v) for k, v in memory.items()}


def analysis_cost(cal: Calibration, domains: list, config, ray_workers: int = 0) -> Estimate:
    """The estimate of one analysis. domains: [(name, [tokens per fact])];
    ray_workers: the Ray workers the per-domain units would spread over (0:
    in this process; the structured route always stays here)."""
    lengths = [list(d) for _, d in domains]
    flat = [n for d in lengths for n in d]
    route = analysis_route(config)
    stages = {"start-up": cal.start_s, "load model": cal.load_s,
              "forward pass": cal.forward_s_per_token * padded_tokens(flat, config.batch_size)}
    subspace = analysis_subspace_s(cal, lengths, config)
    notes = []
    if ray_workers:
        stages["ray start-up"] = RAY_STARTUP_S
    if ray_workers and route != "structured":
        # one thread per worker: the calibrated seconds times the threads they were measured at (an upper bound)
        spread = cal.threads / min(ray_workers, len(lengths))
        subspace = {k: v * spread for k, v in subspace.items()}
        notes.append(f"per-domain solves spread over {min(ray_workers, len(lengths))} single-threaded Ray workers")
    stages.update(subspace)
    stages["ranking"] = analysis_ranking_s(cal, domains, config)
    if config.diagnose and config.estimator != "pilot_gain":
        stages["diagnosis"] = analysis_diagnosis_s(cal, domains, config)
    basis = _basis(cal) + [f"{len(flat)} facts, {predicted_tokens(flat)} predicted tokens, {len(lengths)} domains, "
                           f"route {route}, ranking by {config.estimator}"]
    if route == "cg":
        notes.append("CG is counted at its iteration limit (the subspace dimension unless cg_maxiter is set): "
                     "an upper bound")
    if route != "structured":
        notes.append("Hessian-vector products are scaled from the fine-tune step, not measured themselves")
    memory = analysis_memory(cal, lengths, config)
    memory["ray start-up"], memory["start-up"] = memory["load model"], cal.base_bytes
    return Estimate("analysis", stages, {k: memory[k] for k in stages}, cal.device, basis, notes)


def _basis(cal: Calibration) -> list:
    busy = cal.load_average >= (os.cpu_count() or 1)
    caveat = (f" (the machine was busy then, load average {cal.load_average:.1f}: if it is quiet now, delete "
              f"{calibration_path(cal.fingerprint, cal.device, cal.dtype, cal.threads)} for a new calibration)"
              if busy else "")
    when = cal.created_at[:16].replace("T", " ")
    threads = f"{cal.threads} torch thread{'' if cal.threads == 1 else 's'}"
    return [f"calibration of {cal.model} on {cal.device} ({cal.dtype}, {threads}) at {when} "
            f"UTC{caveat}: forward {cal.forward_s_per_token * 1e3:.2f} ms/token, "
            f"fine-tune step {cal.tail_s_per_param_token * 1e12:.0f} ps per parameter and token, "
            f"float64 {cal.matmul_flops / 1e9:.0f} GFLOP/s",
            f"the model: {cal.n_params / 1e6:.0f}M parameters, {cal.n_layers} blocks, d_ff {cal.d_ff}, "
            f"vocabulary {cal.vocab}",
            "the machine as quiet as the calibration found it (other work on the cores slows a run)"]


# --- the benchmark and the validation ----------------------------------------------------------------------------

def line_work(cal: Calibration, directions: int) -> float:
    """Work per token of the LM-head derivatives along `directions`
    directions, in vocabulary-sized operations: the head product (2 d_model),
    three products with the directions' matrix (6 per direction) and about
    16 elementwise passes."""
    return 2.0 * cal.d_model + 6.0 * directions + 16.0


def subspace_family_s(cal: Calibration, train: list, held: list, names, keep: int, lissa_depth: int = 2000,
                      lissa_batch: int = 8) -> float:
    """The concept-subspace estimators: the LM-head derivatives of every
    token along every domain's direction, each domain's training-loss
    Hessian, and per estimator its solves (Gauss-Newton a second Hessian; CG
    counted at d_ff iterations, LiSSA at its depth: upper bounds); grad_norm
    one gradient of the last blocks per chunk of training facts."""
    n_tokens = predicted_tokens([n for d in train + held for n in d])
    n_train = predicted_tokens([n for d in train for n in d])
    k, d = len(train), cal.d_ff
    seconds = n_tokens * cal.line_s_per_token * line_work(cal, k) / line_work(cal, CALIBRATION_DOMAINS)
    seconds += k * hessian_s(cal, n_train)
    names = set(names)
    solves = len(names & {"paper", "heldout_influence", "influence_ggn", "heldout_influence_ggn"})
    seconds += k * solves * solve_s(cal, d)
    if names & {"influence_ggn", "heldout_influence_ggn"}:
        seconds += k * hessian_s(cal, n_train)
    if "influence_cg" in names:
        seconds += k * d * matmul_s(cal, 4.0 * n_train * d)
    if "influence_lissa" in names:
        batch_tokens = n_train / max(sum(len(t) for t in train), 1) * lissa_batch
        # power iteration (40 full products), then a full product every 50 steps for the residual
        full = 40 + lissa_depth / 50 + 1
        seconds += k * (lissa_depth * matmul_s(cal, 4.0 * batch_tokens * d) + full * matmul_s(cal, 4.0 * n_train * d))
    if "grad_norm" in names:
        seconds += cal.copy_s
        for rows in train:
            calls, padded = chunked(rows)
            seconds += gradients_s(cal, calls, padded, keep, keep)
    return seconds


def _step_padded(base: list, added: list | None, batch: int, added_batch: int, cycled: bool = False) -> float:
    """Padded tokens of one step's minibatch: `batch` facts of the base
    mixture plus `added_batch` of the added facts, padded to the longest.
    cycled: the added minibatch walks permutations of the added facts
    (`TailTrainer.train(..., cycle_added=True)`), so it always holds
    `added_batch` of them, repeating facts when there are fewer."""
    if not added:
        return expected_padded(base, batch)
    drawn = min(added_batch, len(added))
    a = added_batch if cycled else drawn
    return (min(batch, len(base)) + a) * max(expected_longest(base, batch), expected_longest(added, drawn))


def benchmark_units_s(cal: Calibration, sample: list, test: list, pool: list, config, keep: int) -> list:
    """Seconds of every fine-tune unit of the collection protocol
    (`validation.protocol.protocol_units`): per recipe and seed the baseline
    (every domain's test losses before and after) and, per domain, one run
    per dose adding the first n facts of its pool (cycled) and, with the
    second reading, one adding its own sample, each reading its test facts.
    Every run takes `dose_steps(recipe, max(doses))` steps of `batch` facts
    of all the samples plus `added_batch` added facts. sample / test / pool:
    [tokens per fact] per domain, the pool in the order the doses take it."""
    from .validation.protocol import dose_steps

    base = [n for d in sample for n in d]
    tests = [n for d in test for n in d]
    n_max = max(config.doses)
    units = []
    for recipe in config.recipes:
        blocks = min(recipe.blocks, keep)
        steps = dose_steps(recipe, n_max)
        one_seed = [finetune_s(cal, steps, _step_padded(base, None, recipe.batch, recipe.added_batch), keep, blocks,
                               2 * padded_tokens(tests, 16))]
        for k in range(len(sample)):
            read = padded_tokens(test[k], 16)
            for n in sorted(config.doses):
                step = _step_padded(base, pool[k][:n], recipe.batch, recipe.added_batch, cycled=True)
                one_seed.append(finetune_s(cal, steps, step, keep, blocks, read))
            if config.second_reading:
                step = _step_padded(base, sample[k], recipe.batch, recipe.added_batch)
                one_seed.append(finetune_s(cal, steps, step, keep, blocks, read))
        units += one_seed * config.seeds
    units += plan_check_units_s(cal, base, tests, pool, config, keep)
    return units


def plan_check_units_s(cal: Calibration, base: list, tests: list, pool: list, config, keep: int) -> list:
    """Seconds of the plan check's runs (`validation.protocol.plan_run_losses`):
    per budget B and seed three runs (plan, even, proportional) of the main
    recipe's protocol steps, each adding B pool facts in a minibatch of
    ceil(2 B / steps) and reading every test fact. Every allocation is
    costed as the even one: the plan's is not known before its pilots."""
    import math

    from .validation.plan_check import ALLOCATIONS, even_counts
    from .validation.protocol import dose_steps

    recipe = next(r for r in config.recipes if r.name == config.main_recipe)
    blocks = min(recipe.blocks, keep)
    steps = dose_steps(recipe, max(config.doses))
    units = []
    for budget in config.plan_budgets:
        counts = even_counts(budget, [len(p) for p in pool])
        added = [n for p, m in zip(pool, counts) for n in p[:m]]
        wide = max(recipe.added_batch, math.ceil(2 * len(added) / steps))
        step = _step_padded(base, added, recipe.batch, wide, cycled=True)
        units += [finetune_s(cal, steps, step, keep, blocks, padded_tokens(tests, 16))] * (len(ALLOCATIONS) * config.seeds)
    return units


def benchmark_estimators_s(cal: Calibration, train: list, held: list, config, keep: int) -> dict:
    """Seconds of each estimator family the configuration asks for, on the
    samples' halves (train / held)."""
    names = list(config.estimators)
    main = next(r for r in config.recipes if r.name == config.main_recipe)
    out = {}
    subspace = in_family(names, "subspace")
    if subspace or config.curve_domains:
        out["subspace estimators"] = subspace_family_s(cal, train, held, subspace or ["mean_loss"], keep)
    aligned = in_family(names, "alignment")
    if aligned:
        query = held if any("heldout" in e for e in aligned) else None
        out["alignment estimators"] = alignment_family_s(
            cal, train, query, any(e.endswith("_adam") for e in aligned), config.adam_batches, keep,
            min(config.align_blocks, keep), plain=any(not e.endswith("_adam") for e in aligned))
    if in_family(names, "ekfac"):
        out["EK-FAC"] = ekfac_s(cal, train, held, min(config.ekfac_blocks, keep), config.ekfac_fit_facts, keep)
    along = in_family(names, "trajectory")
    if along:
        out["trajectory estimators"] = trajectory_family_s(
            cal, train, held, along, main, keep, config.adam_batches, checkpoints=len(config.checkpoints),
            lr_known=not config.checkpoints or config.checkpoint_lr is not None)
    if in_family(names, "airrep"):
        out["AirRep"] = airrep_s(cal, train, held, main, keep)
    pilots = in_family(names, "pilot")
    if pilots:
        out["pilot estimators"] = pilot_family_s(cal, train, held, pilots, keep, config.pilot_sizes,
                                                 config.batch_size)
    return out


def benchmark_memory(cal: Calibration, train: list, held: list, keep: int, recipes, batch_size: int,
                     align_blocks: int, ekfac_blocks: int, ray_workers: int = 0, truth: list | None = None,
                     pilots=()) -> dict:
    """Peak bytes per stage of a benchmark. Resident throughout: the process,
    the weights, the forward pass's per-token tensors and block inputs (with
    `truth`, the tokens per fact of the ground truth's own pass over every
    fact, its tensors too), and the fine-tune trainer on the ground truth's
    facts (its tail copy, the starting weights, its own copy of the block
    inputs; building it deep-copies the whole model once). From the subspace
    estimators on: the head product of every token the estimators see
    (vocabulary wide; built chunk by chunk and concatenated, so twice that
    while it is built) and every domain's gradients and Hessian. Each stage
    adds its own working set; the pilot estimators (`pilots`: those asked)
    a trainer of their own on the samples and the whole model's gradients
    (`pilot_memory`)."""
    b, d, v = cal.dtype_bytes, cal.d_ff, cal.vocab
    flat = [n for dom in train + held for n in dom]
    n_tokens, facts, k = predicted_tokens(flat), len(flat), len(train)
    inputs = sum(flat) * cal.d_model * b
    per_token = (d + cal.d_model + 6) * b
    resident = cal.base_bytes + max(cal.model_bytes, cal.n_params * b) + n_tokens * per_token + inputs
    every = flat if truth is None else list(truth)
    truth_inputs = inputs if truth is None else sum(every) * cal.d_model * b
    if truth is not None:
        resident += predicted_tokens(every) * per_token + truth_inputs
    trainer = truth_inputs + 2 * tail_params(cal, keep) * b
    line = n_tokens * v * b
    terms = k * (facts * d + d * d) * 8 + 3 * k * n_tokens * 8
    blocks = max(min(r.blocks, keep) for r in recipes)
    trained = trainable_params(cal, blocks) * b
    step = cal.step_bytes_per_token * max(r.batch + r.added_batch for r in recipes) * max(every)
    batch = max(max(len(x[i: i + batch_size]) * max(x[i: i + batch_size]) for i in range(0, len(x), batch_size))
                for x in (flat, every))
    after = resident + trainer + line + terms
    memory = {"load model": cal.base_bytes + max(cal.model_bytes, cal.n_params * b),
              "forward pass": resident + cal.forward_bytes_per_token * batch,
              "subspace estimators": resident + trainer + 2 * line + terms
              + cal.coef_bytes_per_token * min(LINE_CHUNK, n_tokens),
              "alignment estimators": after + max(cal.n_params * b, tail_params(cal, keep) * b
                                                  + 10 * trainable_params(cal, min(align_blocks, keep)) * 8)
              + cal.step_bytes_per_token * GRAD_CHUNK * max(flat),
              "EK-FAC": after + tail_params(cal, keep) * b + 3 * ekfac_blocks * sum(
                  (i * i + o * o) * 4 + EKFAC_BATCH * i * o * 4 for i, o in cal.linear_shapes) + step,
              "trajectory estimators": after + (max(r.steps for r in recipes) + 10) * trained * 2 + step,
              "AirRep": after + 3 * trained + step,
              "pilot estimators": after + pilot_memory(cal, train, held, keep, pilots, batch_size),
              "fine-tunes": after + 3 * trained + step}
    if ray_workers:
        worker = cal.base_bytes + trainer + tail_params(cal, keep) * b + 3 * trained + step
        memory["fine-tunes"] = after + ray_workers * worker + trainer
    memory["learning-curve predictions"] = after + 4 * d * d * 8
    memory["leaderboard"] = after
    memory["ray start-up"] = memory["start-up"] = cal.base_bytes
    return {name: int(value) for name, value in memory.items()}


def leaderboard_sets(names: list) -> int:
    """The per-group leaderboards a benchmark of these domains builds
    (`leaderboard.group_leaderboards`): all domains, the ordinary ones and
    the hard cases, each only with at least 3 domains."""
    from .domains import benchmark_groups, domain_set

    groups = benchmark_groups()
    hard = sum(domain_set(groups.get(n)) == "hard" for n in names)
    return sum(count >= 3 for count in (len(names), len(names) - hard, hard))


def benchmark_cost(cal: Calibration, train: list, held: list, test: list, pool: list, config, ray_workers: int = 0,
                   ray_local: bool = True) -> Estimate:
    """The estimate of one benchmark under the collection protocol
    (`validation.protocol`). train / held: [(name, [tokens per fact])] of
    the halves of each domain's sample (what the estimators see); test /
    pool: the same of its test facts and its pool (in the order the doses
    take it). ray_workers: Ray workers for the fine-tunes (0: in this
    process); ray_local: they share this machine's cores with the
    estimators."""
    from .validation.plan_check import ALLOCATIONS

    from .validation.protocol import dose_steps

    names = [n for n, _ in train]
    tr, he = [list(x) for _, x in train], [list(x) for _, x in held]
    te, po = [list(x) for _, x in test], [list(x) for _, x in pool]
    sample = [a + b for a, b in zip(tr, he)]
    keep = min(cal.n_layers, max([r.blocks for r in config.recipes] + [config.align_blocks]))
    flat = [n for d in tr for n in d] + [n for d in he for n in d]
    # the ground truth's pass: every domain's sample then its pool, then every domain's test facts
    everything = [n for s, p in zip(sample, po) for n in s + p] + [n for d in te for n in d]
    stages = {"start-up": cal.start_s, "load model": cal.load_s,
              "forward pass": cal.forward_s_per_token * (padded_tokens(flat, config.batch_size)
                                                         + padded_tokens(everything, config.batch_size))}
    families = benchmark_estimators_s(cal, tr, he, config, keep)
    stages.update(families)
    units = benchmark_units_s(cal, sample, te, po, config, keep)
    notes = []
    if ray_workers:
        # each unit on one thread: the calibrated seconds times its threads (an upper bound)
        work = sum(units) * cal.threads
        estimators = sum(families.values())
        wall = (estimators + work) / ray_workers if ray_local else max(estimators, math.ceil(
            len(units) / ray_workers) * work / len(units))
        stages["ray start-up"] = RAY_STARTUP_S
        stages["fine-tunes"] = max(wall - estimators, 0.0)
        notes.append(f"{len(units)} fine-tunes on {ray_workers} single-threaded Ray workers beside the estimators")
    else:
        stages["fine-tunes"] = sum(units)
    # the trainer: a tail copy, checked on the first 16 test facts
    stages["fine-tunes"] += cal.copy_s + tail_pass_s(cal, padded_tokens([n for d in te for n in d][:16], 16), keep)
    curves = sum(1 for n in config.curve_domains if n in names)
    stages["learning-curve predictions"] = curves * (hessian_s(cal, max(predicted_tokens(t) for t in tr))
                                                     + 32 * solve_s(cal, cal.d_ff, lu=True))
    # per estimator: every reading's leaderboard, and the main reading's per group
    readings = len(config.recipes) * (2 if config.second_reading else 1)
    stages["leaderboard"] = (len(config.estimators) * (readings + leaderboard_sets(names)) * config.bootstrap
                             * cal.leaderboard_s_per_resample)
    per_seed = 1 + len(names) * (len(config.doses) + int(config.second_reading))
    steps = ", ".join(sorted({str(dose_steps(r, max(config.doses))) for r in config.recipes}, key=int))
    basis = _basis(cal) + [
        f"{len(names)} domains: samples of {sum(map(len, sample))} facts ({predicted_tokens(flat)} predicted "
        f"tokens), {sum(map(len, te))} test facts, pools of {sum(map(len, po))}; {len(config.estimators)} "
        f"estimators; {len(units)} fine-tunes of {steps} steps ({len(config.recipes)} recipes x {config.seeds} seeds "
        f"x {per_seed}: the baseline and per domain {len(config.doses)} doses"
        + (" and its sample" if config.second_reading else "") + ")"
        + (f", {len(ALLOCATIONS) * len(config.plan_budgets) * config.seeds} of them the plan check's "
           f"({len(ALLOCATIONS)} allocations x "
           f"{len(config.plan_budgets)} budgets x {config.seeds} seeds)" if config.plan_budgets else "")]
    notes.append("AirRep's encoder training and kronfluence's bookkeeping are left out (seconds)")
    memory = benchmark_memory(cal, tr, he, keep, config.recipes, config.batch_size, config.align_blocks,
                              config.ekfac_blocks, ray_workers if ray_local else 0, truth=everything,
                              pilots=in_family(config.estimators, "pilot"))
    return Estimate("benchmark", stages, {k: memory[k] for k in stages}, cal.device, basis, notes)


def subspace_truth_s(cal: Calibration, train: list, held: list, eps: int, newton_steps: int) -> float:
    """The validation's ground truth in S_k: per domain and upweight, Newton
    steps that each need the LM-head derivatives along v_k over the training
    tokens, a Hessian and a solve, and the held-out losses along v_k."""
    n_train = predicted_tokens([n for d in train for n in d])
    n_held = predicted_tokens([n for d in held for n in d])
    along = cal.line_s_per_token * line_work(cal, 1) / line_work(cal, CALIBRATION_DOMAINS)
    step = n_train * along + hessian_s(cal, n_train) + solve_s(cal, cal.d_ff)
    return len(train) * (eps * newton_steps * step + (eps + 1) * n_held * along + solve_s(cal, cal.d_ff))


def validation_cost(cal: Calibration, train: list, held: list, config, ray_workers: int = 0) -> Estimate:
    """The estimate of one quick validation (`validation.validate`); train /
    held as in `benchmark_cost`."""
    from .validation.finetune import validation_recipe

    tr, he = [list(x) for _, x in train], [list(x) for _, x in held]
    keep = min(config.finetune_blocks, cal.n_layers)
    recipe = validation_recipe(config, keep)
    flat = [n for d in tr for n in d] + [n for d in he for n in d]
    names = list(dict.fromkeys(["paper"] + list(config.estimators)))
    stages = {"start-up": cal.start_s, "load model": cal.load_s,
              "forward pass": cal.forward_s_per_token * padded_tokens(flat, config.batch_size)}
    estimators = subspace_family_s(cal, tr, he, in_family(names, "subspace"), keep,
                                   config.lissa_depth, config.lissa_batch_facts)
    aligned = in_family(names, "alignment")
    if aligned and config.finetune:
        estimators += alignment_family_s(cal, tr, he if any("heldout" in e for e in aligned) else None,
                                         any(e.endswith("_adam") for e in aligned), 8, keep, keep,
                                         plain=any(not e.endswith("_adam") for e in aligned))
    along = in_family(names, "trajectory")
    if along and config.finetune:
        estimators += trajectory_family_s(cal, tr, he, along, recipe, keep, 8, checkpoints=len(config.checkpoints),
                                          lr_known=not config.checkpoints or config.checkpoint_lr is not None)
    stages["estimators"] = estimators
    if config.subspace:
        stages["subspace ground truth"] = subspace_truth_s(cal, tr, he, len(config.eps), config.newton_steps)
    if config.finetune:
        pool, held_all = [n for d in tr for n in d], [n for d in he for n in d]
        runs = [finetune_s(cal, recipe.steps, _step_padded(pool, rows, recipe.batch, recipe.added_batch), keep,
                           keep, padded_tokens(held_all, config.batch_size)) for rows in [None] + tr]
        seconds = sum(runs) + cal.copy_s + tail_pass_s(cal, padded_tokens(held_all, config.batch_size), keep)
        if ray_workers:
            seconds = RAY_STARTUP_S + math.ceil(len(runs) / ray_workers) * max(runs) * cal.threads
        stages["fine-tuning ground truth"] = seconds
    stages["leaderboard"] = len(names) * config.bootstrap * cal.leaderboard_s_per_resample
    memory = benchmark_memory(cal, tr, he, keep, [recipe], config.batch_size, keep, 0)
    memory["estimators"] = max(memory["subspace estimators"], memory["alignment estimators"],
                               memory["trajectory estimators"])
    memory["subspace ground truth"] = memory["leaderboard"] + 4 * cal.d_ff ** 2 * 8
    memory["fine-tuning ground truth"] = memory["fine-tunes"]
    basis = _basis(cal) + [f"{len(tr)} domains, {len(flat)} facts ({predicted_tokens(flat)} predicted tokens), "
                           f"{len(names)} estimators, {len(tr) + 1} fine-tunes of {recipe.steps} steps"]
    notes = ["CG and LiSSA are counted at d_ff iterations and their full depth: upper bounds"]
    return Estimate("validation", stages, {k: memory[k] for k in stages}, cal.device, basis, notes)


def plan_units_s(cal: Calibration, train: list, held: list, sizes, steps: int, keep: int) -> list:
    """Seconds of every pilot fine-tune of a plan (`plan.measure_pilots`):
    per domain whose halves A (train) and B (held) have 2 facts each, per n
    of `pilots.pilot_sizes`, `steps` steps on A's first n facts (all of them
    in every step: n times the longest) then B's losses read in batches of
    16, and the same from B to A. Every unit trains all `keep` kept blocks."""
    from .pilots import pilot_sizes

    units = []
    for a, b in zip(train, held):
        if min(len(a), len(b)) < 2:
            continue
        for n in pilot_sizes(sizes, len(a), len(b)):
            units.append(finetune_s(cal, steps, n * max(a[:n]), keep, keep, padded_tokens(b, 16)))
            units.append(finetune_s(cal, steps, n * max(b[:n]), keep, keep, padded_tokens(a, 16)))
    return units


def plan_cost(cal: Calibration, train: list, held: list, config) -> Estimate:
    """The estimate of a plan's pilots (a PilotConfig or PlanConfig); train /
    held as in `benchmark_cost`, the halves of `splitting.split_domains`.
    Memory as the benchmark's forward pass and fine-tunes hold it, without
    the estimators' working sets."""
    from .pilots import PILOT_RECIPE

    tr, he = [list(x) for _, x in train], [list(x) for _, x in held]
    keep = min(PILOT_RECIPE.blocks, cal.n_layers)
    flat = [n for d in tr for n in d] + [n for d in he for n in d]
    units = plan_units_s(cal, tr, he, config.pilot_sizes, PILOT_RECIPE.steps, keep)
    stages = {"start-up": cal.start_s, "load model": cal.load_s,
              "forward pass": cal.forward_s_per_token * padded_tokens(flat, config.batch_size),
              # the trainer: a tail copy, checked on 16 held-out facts
              "pilot fine-tunes": sum(units) + cal.copy_s + tail_pass_s(cal, 16 * max(flat), keep)}
    b, d = cal.dtype_bytes, cal.d_ff
    inputs = sum(flat) * cal.d_model * b
    resident = (cal.base_bytes + max(cal.model_bytes, cal.n_params * b)
                + predicted_tokens(flat) * (d + cal.d_model + 6) * b + inputs)
    batch = max(len(flat[i: i + config.batch_size]) * max(flat[i: i + config.batch_size])
                for i in range(0, len(flat), config.batch_size))
    largest = max([min(len(a), len(h)) for a, h in zip(tr, he)] + [1])
    memory = {"start-up": cal.base_bytes, "load model": cal.base_bytes + max(cal.model_bytes, cal.n_params * b),
              "forward pass": resident + cal.forward_bytes_per_token * batch,
              "pilot fine-tunes": resident + inputs + 2 * tail_params(cal, keep) * b
              + 3 * trainable_params(cal, keep) * b + cal.step_bytes_per_token * largest * max(flat)}
    basis = _basis(cal) + [f"{len(tr)} domains, {len(flat)} facts ({predicted_tokens(flat)} predicted tokens), "
                           f"{len(units)} pilot fine-tunes of {PILOT_RECIPE.steps} steps on the last {keep} blocks"]
    notes = ["the fits, bands and allocation after the pilots take well under a second and are left out"]
    return Estimate("plan", stages, memory, cal.device, basis, notes)


# --- from a request to an estimate -------------------------------------------------------------------------------

def load_tokenizer(model_id):
    """The model's tokenizer alone (for counting tokens when the calibration
    is cached), from where `models.load_model` would take it."""
    from transformers import AutoTokenizer

    from .models import ModelError, converted_dir, resolve_model

    _, source, location = resolve_model(model_id)
    folder = converted_dir(Path(location)) if source in ("embedded", "gguf") else location
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=source == "hub", trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"The tokenizer of '{model_id}' could not be loaded: {str(exc).splitlines()[0]}") from None


def domain_tokens(tokenizer, cal: Calibration, domains) -> list:
    """[(name, [tokens per fact])] of Domain objects; ValueError when they come
    to more tokens than a run accepts, as the run itself would refuse."""
    from .limits import too_many_tokens

    counted, total = [], 0
    for d in domains:
        lengths = token_lengths(tokenizer, d.facts, cal.max_positions)
        total += sum(lengths)
        refusal = too_many_tokens(total)
        if refusal:
            raise ValueError(refusal[:1].upper() + refusal[1:])
        counted.append((d.name, lengths))
    return counted


def ray_workers(executor) -> tuple:
    """(workers, local) of an ExecutorConfig (None: in this process): a Ray
    started here has num_cpus (else every core) single-threaded workers; for
    a cluster joined by address the same count is assumed."""
    if executor is None or executor.kind != "ray":
        return 0, True
    return int(executor.num_cpus or os.cpu_count() or 1), executor.address is None


def _calibrated(model_id, device: str, dtype: str, threads: int | None, calibration):
    if calibration is not None:
        return calibration, None
    return calibrate(model_id, device, dtype, threads)


def estimate_analysis(model_id, domains, config=None, executor=None, use_cache: bool = True,
                      calibration: Calibration | None = None, tokenizer=None) -> Estimate:
    """What `analysis.run_analysis(model_id, domains, config)` would cost.
    Bad input raises what the run raises (DomainError, ModelError,
    ValueError), before anything is measured. With use_cache and a stored
    result the run returns at once; the estimate says so and what computing
    it afresh would cost. executor: an ExecutorConfig; calibration and
    tokenizer: the model's, when the caller has them."""
    from .analysis import cache_key
    from .config import AnalysisConfig
    from .domains import as_domains

    config = config or AnalysisConfig()
    domains = as_domains(domains)
    if config.checkpoints:
        from .checkpoints import validate_checkpoints

        validate_checkpoints(config.checkpoints)
    cal, loaded = _calibrated(model_id, config.device, config.dtype, None, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    workers, _ = ray_workers(executor)
    estimate = analysis_cost(cal, domain_tokens(tokenizer, cal, domains), config, workers)
    if use_cache and (cache_dir() / "results").is_dir():
        from .store import ResultStore

        if ResultStore().get(cache_key(model_id, domains, config)) is not None:
            estimate.notes.insert(0, f"a result of this request is cached: the run returns it at once "
                                     f"(computed afresh, with --no-cache, about {format_seconds(estimate.total_s)})")
            estimate.stages_s = {"cached result": 0.0}
            estimate.memory_bytes = {"cached result": cal.base_bytes}
    return estimate


def estimate_benchmark(model_id=None, domains=None, config=None, device: str = "cpu", threads: int | None = None,
                       executor=None, calibration: Calibration | None = None, tokenizer=None) -> Estimate:
    """What `validation.benchmark.run_benchmark` would cost (domains None:
    the shipped benchmark domains, ordinary and hard cases). Each domain is
    cut as the run cuts it (max_facts, then the collection protocol's
    sample, test facts and pool, and the sample's halves). threads: the
    torch threads it would run with (None: the current setting)."""
    from .domains import benchmark_domains
    from .splitting import split_domains
    from .validation.benchmark import BenchmarkConfig, check_domains
    from .validation.protocol import collection_split

    config = config or BenchmarkConfig()
    if config.checkpoints:
        from .checkpoints import check_last_is_model, validate_checkpoints

        check_last_is_model(validate_checkpoints(config.checkpoints), model_id)
    domains = check_domains(domains if domains is not None else benchmark_domains(), config)
    protocol = collection_split(domains, config.seed, config.sample_facts, config.test_facts)
    train, held = split_domains(protocol["sample"], config.seed, config.held_out_fraction)
    cal, loaded = _calibrated(model_id, device, "float32", threads, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    workers, local = ray_workers(executor)
    parts = [domain_tokens(tokenizer, cal, part) for part in (train, held, protocol["test"], protocol["pool"])]
    return benchmark_cost(cal, *parts, config, workers, local)


def estimate_validation(model_id, domains, config=None, held_out=None, executor=None,
                        calibration: Calibration | None = None, tokenizer=None) -> Estimate:
    """What `validation.validate.validate` would cost (float32 on the CPU,
    as it runs). held_out: {name: [facts]} or None (a seeded half)."""
    from .domains import as_domains
    from .splitting import split_domains
    from .validation.validate import ValidationConfig

    config = config or ValidationConfig()
    if config.checkpoints:
        from .checkpoints import check_last_is_model, validate_checkpoints

        check_last_is_model(validate_checkpoints(config.checkpoints), model_id)
    train, held = split_domains(as_domains(domains), config.seed, config.held_out_fraction, held_out)
    cal, loaded = _calibrated(model_id, "cpu", "float32", None, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    workers, _ = ray_workers(executor)
    return validation_cost(cal, domain_tokens(tokenizer, cal, train), domain_tokens(tokenizer, cal, held), config,
                           workers)


def report(build, out=None) -> int:
    """The command line's --estimate: build the estimates (a callable
    returning a list of Estimate), print each with the machine's available
    memory, and return the exit code: 0; 2 with the run's one-line error on
    bad input, or with the refusal when a peak exceeds the memory available."""
    import sys

    from .domains import DomainError
    from .models import ModelError

    out = out or sys.stdout
    try:
        estimates = build()
    except (ModelError, DomainError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refusals = []
    for estimate in estimates:
        available = available_memory_bytes(estimate.device)
        refusal = memory_refusal(estimate, available)
        if refusal:
            refusals.append(refusal)
        print(format_estimate(estimate, available), file=out)
    busy = load_note()
    if busy:
        print(busy, file=out)
    if len(estimates) > 1:
        print(f"All {len(estimates)}: {format_seconds(sum(e.total_s for e in estimates))} one after the other.",
              file=out)
    print("Nothing was run (--estimate).", file=out)
    if refusals:
        print(f"error: {refusals[0]}", file=sys.stderr)
        return 2
    return 0


def estimate_plan(model_id, domains, config=None, use_cache: bool = True, calibration: Calibration | None = None,
                  tokenizer=None) -> Estimate:
    """What a plan's pilots (`plan.pilot_measurements`, a plan job) would
    cost; config a PilotConfig or PlanConfig. With use_cache and the pilots
    stored under their `plan_key` the run returns them at once, and the
    estimate says so."""
    from .domains import as_domains
    from .plan import PilotConfig, plan_key
    from .splitting import split_domains

    config = config or PilotConfig()
    domains = as_domains(domains)
    train, held = split_domains(domains, config.seed)
    cal, loaded = _calibrated(model_id, config.device, config.dtype, None, calibration)
    tokenizer = tokenizer or (loaded.tokenizer if loaded is not None else load_tokenizer(model_id))
    estimate = plan_cost(cal, domain_tokens(tokenizer, cal, train), domain_tokens(tokenizer, cal, held), config)
    if use_cache and (cache_dir() / "plans").is_dir():
        from .store import JsonStore

        if JsonStore("plans").get(plan_key(model_id, domains, config)) is not None:
            estimate.notes.insert(0, f"these pilots are cached: the run returns them at once (measured afresh, "
                                     f"about {format_seconds(estimate.total_s)})")
            estimate.stages_s = {"cached pilots": 0.0}
            estimate.memory_bytes = {"cached pilots": cal.base_bytes}
    return estimate
