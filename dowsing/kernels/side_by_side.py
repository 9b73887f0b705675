"""Independent pieces of work side by side: one per thread, each thread
with its share of the cores.

The engine's pieces are small: a pilot run trains the last blocks for a few
steps on a handful of facts, a domain's forward pass runs batches of a few
hundred tokens. On such matrices torch's intra-op threads spend much of
their time meeting at barriers, and a busy machine stalls every barrier
(OpenMP threads spin while they wait). Measured on the 2-core machine, two
domains' pilot curves one after the other on two threads took 10.5 s idle
and 104 s with other work on the cores; side by side on one thread each,
10.5 s and 34 s. The forward pass of the four default domains took 23-75 s
against 10-16 s side by side on the busy machine.

A piece's numbers do not depend on which thread runs it or on what runs
beside it: every piece computes on `threads_per_run` intra-op threads.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import torch

MAX_WORKERS = 4  # each fine-tune worker holds a copy of the tail and AdamW's moments: memory grows with it
JOIN_POLL_S = 0.2  # the waiting thread wakes this often, so a signal (a cancelled job) is handled at once


def pool_workers(device: str, threads: int | None = None, runs: int = MAX_WORKERS) -> int:
    """How many pieces run side by side: one per core torch uses here, at
    most MAX_WORKERS and at most the pieces there are; one on a GPU, which
    runs one kernel stream at a time."""
    if device != "cpu":
        return 1
    threads = int(threads or torch.get_num_threads())
    return max(1, min(threads, MAX_WORKERS, runs))


def threads_per_run(workers: int, threads: int | None = None) -> int:
    """torch intra-op threads of each piece: the cores shared out evenly."""
    return max(1, int(threads or torch.get_num_threads()) // max(1, workers))


def side_by_side(fn: Callable, items: list, contexts: list, threads: int) -> list:
    """fn(context, item) for every item, one thread per context (each with
    `threads` intra-op threads), taking the items in order as they come
    free; the values in the items' order. The first failure stops the rest
    from starting and is raised here, on the caller's thread; so is a signal
    the caller's thread receives while it waits (a cancelled job), and the
    pieces in flight are then left to the process's exit."""
    items = list(items)
    contexts = contexts[:max(1, len(items))]
    if len(contexts) == 1:
        return _in_turn(fn, items, contexts[0], threads)
    results: list = [None] * len(items)
    errors: list = []
    lock = threading.Lock()
    queue = list(range(len(items)))

    def work(context) -> None:
        torch.set_num_threads(threads)  # each thread keeps its own OpenMP team size
        while True:
            with lock:
                if not queue or errors:
                    return
                i = queue.pop(0)
            try:
                results[i] = fn(context, items[i])
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                with lock:
                    errors.append(exc)
                return

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    # daemon threads: a cancelled job exits without waiting for the pieces in flight
    workers = [threading.Thread(target=work, args=(c,), daemon=True, name=f"side-by-side-{k}")
               for k, c in enumerate(contexts)]
    try:
        for t in workers:
            t.start()
        for t in workers:
            while t.is_alive():
                t.join(JOIN_POLL_S)
    except BaseException:
        with lock:
            queue.clear()
        raise
    finally:
        torch.set_num_threads(saved)
    if errors:
        raise errors[0]
    return results


def _in_turn(fn: Callable, items: list, context, threads: int) -> list:
    """One worker: the items on the caller's thread, which keeps the OpenMP
    team it has (a new thread would start a team of its own)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [fn(context, item) for item in items]
    finally:
        torch.set_num_threads(saved)


def twin(trainer):
    """A second trainer over the same data and starting weights, on its own
    copy of the truncated model (its weights change while it trains). The
    starting weights and the data are only read, so they are shared."""
    from .training import TailTrainer

    return TailTrainer.from_parts(copy.deepcopy(trainer.work), trainer.data, original=trainer.original)


class TrainerPool:
    """`workers` trainers over one trainer's data; `map(fn, items)` runs
    fn(trainer, item) for every item side by side (`side_by_side`) and
    returns the values in the items' order. With one worker every item runs
    on the caller's thread with all the threads.

    The twins are made on first use and kept for the next map."""

    def __init__(self, trainer, workers: int, threads: int | None = None):
        self.trainers = [trainer]
        self.workers = max(1, int(workers))
        self.threads = threads_per_run(self.workers, threads)
        self.data = trainer.data

    def map(self, fn: Callable, items: list) -> list:
        items = list(items)
        while len(self.trainers) < min(self.workers, len(items)):
            self.trainers.append(twin(self.trainers[0]))
        return side_by_side(fn, items, self.trainers[:min(self.workers, len(items))], self.threads)
