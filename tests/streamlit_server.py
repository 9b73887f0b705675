"""A Streamlit server for the real-browser tests and the browser benchmark:
started on a free localhost port in a session of its own, returned once its
health check answers, stopped with everything it started (a spare worker)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(script: Path, cwd: Path, env: dict, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`streamlit run script` on 127.0.0.1: (the process, its URL). Its
    output goes to `log` (else nowhere); a server that exits or does not
    answer within START_TIMEOUT_S is killed, and RuntimeError says why."""
    port = free_port()
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()  # the child holds its own copy
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            said = log.read_text(errors="replace")[-3000:] if log is not None else "(no log kept)"
            raise RuntimeError("streamlit did not start:\n" + said)
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    """End the server's whole session (its spare worker goes with it)."""
    for sig, wait_s in ((15, 15), (9, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
