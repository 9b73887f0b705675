"""The spare worker: a worker process started before there is a job for it.

A fresh worker spends about 5 s importing torch, transformers and the engine
before a run computes anything, and a user who edits a domain and clicks Run
pays that every time. The runner therefore keeps one worker already started
and warmed (``python -m dowsing.background.worker --spare``: imports done, no
model loaded) blocked on one line of its stdin. Handing it a job is writing
the job id there; from then on it is that job's worker, exactly as a cold
one: its own session, its own log, the same exit codes.

The spare is no job: it is in no store and no queue and holds no lock. It
ends at EOF on its stdin, which the kernel delivers when this process closes
the pipe or dies however it dies, so a spare never outlives the app.
"""
from __future__ import annotations

import subprocess
import sys

SPARE_FLAG = "--spare"


def settings_of(env: dict) -> dict:
    """What in an environment changes what a job does: the DOWSING_*
    variables and the import path."""
    return {k: v for k, v in env.items() if k.startswith("DOWSING_") or k == "PYTHONPATH"}


class SpareWorker:
    """One warm worker process waiting for a job id on its stdin.

    env, cwd: those of a cold worker. A spare is used only while this
    process's own settings (the DOWSING_* variables) and the import path are
    what they were when it started (`matches`); other variables are left
    out, since libraries set their defaults in os.environ as they import
    (torch sets TORCHINDUCTOR_CACHE_DIR) and the spare's own imports set the
    same.
    """

    def __init__(self, env: dict, cwd: str):
        self.env = dict(env)
        self.cwd = cwd
        self.handed_over = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dowsing.background.worker", SPARE_FLAG],
            stdin=subprocess.PIPE,
            # until it has a job it has nothing to say; once it has one it writes to the job's log
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.env,
            cwd=cwd,
            # its own session from the start, so a cancel of its job reaches everything it starts
            start_new_session=True,
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def matches(self, env: dict, cwd: str) -> bool:
        return settings_of(self.env) == settings_of(env) and self.cwd == cwd

    def hand_over(self, job_id: str) -> subprocess.Popen | None:
        """Give the spare `job_id`; its process handle, now the job's worker,
        or None when the spare has died (the caller starts a cold worker)."""
        if self.handed_over or not self.alive():
            return None
        try:
            self.proc.stdin.write(job_id.encode("ascii") + b"\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            return None
        self.handed_over = True
        return self.proc

    def close(self, wait_s: float = 0.5) -> None:
        """End the spare: EOF on its stdin, which it answers by exiting;
        SIGKILL if it has not within `wait_s` (it may still be importing).
        A spare already handed a job is that job's worker: left alone."""
        if self.handed_over:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
