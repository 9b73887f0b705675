"""Independent fine-tunes side by side: one TailTrainer per thread, each
thread with its share of the cores.

A pilot run trains the last blocks for a few steps on a handful of facts:
matrices of a few dozen rows, where torch's intra-op threads spend much of
their time meeting at barriers, and where a busy machine stalls every
barrier (OpenMP threads spin while they wait). Two runs on one thread each
did the same work in 12% less time than one after the other on two threads
on an idle 2-core machine, and in a quarter of the time with other work on
the cores. The runs of a pilot curve need nothing from each other, so they
go side by side, each on its own copy of the trained blocks.

Every run computes on `threads_per_run` intra-op threads whichever thread
takes it and however many run beside it, so its numbers do not depend on
the schedule.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import torch

MAX_WORKERS = 4  # each worker holds a copy of the tail and AdamW's moments: memory grows with it
JOIN_POLL_S = 0.2  # the waiting thread wakes this often, so a signal (a cancelled job) is handled at once


def pool_workers(device: str, threads: int | None = None, runs: int = MAX_WORKERS) -> int:
    """How many fine-tunes run side by side: one per core torch uses here,
    at most MAX_WORKERS and at most the runs there are; one on a GPU, which
    runs one kernel stream at a time."""
    if device != "cpu":
        return 1
    threads = int(threads or torch.get_num_threads())
    return max(1, min(threads, MAX_WORKERS, runs))


def threads_per_run(workers: int, threads: int | None = None) -> int:
    """torch intra-op threads of each run: the cores shared out evenly."""
    return max(1, int(threads or torch.get_num_threads()) // max(1, workers))


def twin(trainer):
    """A second trainer over the same data and starting weights, on its own
    copy of the truncated model (its weights change while it trains). The
    starting weights and the data are only read, so they are shared."""
    from .training import TailTrainer

    other = TailTrainer.from_parts(copy.deepcopy(trainer.work), trainer.data, original=trainer.original)
    return other


class TrainerPool:
    """`workers` trainers over one trainer's data; `map(fn, items)` runs
    fn(trainer, item) for every item, side by side, and returns the values
    in the items' order. With one worker it is the trainer itself, run
    item after item on the caller's thread.

    The twins are made on first use and kept for the next map."""

    def __init__(self, trainer, workers: int, threads: int | None = None):
        self.trainers = [trainer]
        self.workers = max(1, int(workers))
        self.threads = threads_per_run(self.workers, threads)
        self.data = trainer.data

    def _ensure(self, count: int) -> None:
        while len(self.trainers) < count:
            self.trainers.append(twin(self.trainers[0]))

    def map(self, fn: Callable, items: list) -> list:
        items = list(items)
        workers = min(self.workers, len(items))
        if workers <= 1:
            return self._serial(fn, items)
        self._ensure(workers)
        results: list = [None] * len(items)
        errors: list = []
        lock = threading.Lock()
        queue = list(range(len(items)))

        def work(trainer) -> None:
            torch.set_num_threads(self.threads)  # each thread keeps its own OpenMP team size
            while True:
                with lock:
                    if not queue or errors:
                        return
                    i = queue.pop(0)
                try:
                    results[i] = fn(trainer, items[i])
                except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                    with lock:
                        errors.append(exc)
                    return

        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        # daemon threads: a cancelled job exits without waiting for the runs in flight
        threads = [threading.Thread(target=work, args=(t,), daemon=True, name=f"fine-tune-{k}")
                   for k, t in enumerate(self.trainers[:workers])]
        try:
            for t in threads:
                t.start()
            for t in threads:
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

    def _serial(self, fn: Callable, items: list) -> list:
        saved = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return [fn(self.trainers[0], item) for item in items]
        finally:
            torch.set_num_threads(saved)
