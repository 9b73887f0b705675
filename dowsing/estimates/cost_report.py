"""The estimate of a run as a record (`Estimate`: predicted seconds and peak
bytes per stage, what they rest on) and how it is shown and checked: its
text, the memory this machine has available, the refusal of a run whose
peak would not fit, and the command line's --estimate (`report`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .calibration import calibration_path, current_load_average


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


def load_note() -> str | None:
    """A line on other work sharing the cores now, or None when the machine
    is quiet: the estimate assumes the quiet machine the calibration saw."""
    load = current_load_average()
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


def report(build, out=None) -> int:
    """The command line's --estimate: build the estimates (a callable
    returning a list of Estimate), print each with the machine's available
    memory, and return the exit code: 0; 2 with the run's one-line error on
    bad input, or with the refusal when a peak exceeds the memory available."""
    import sys

    from ..domains import DomainError
    from ..access.models import ModelError

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


def calibration_basis(cal) -> list:
    """What an estimate rests on: the calibration (flagged when the machine
    was busy then), the model's shape, and a quiet machine."""
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
