"""An operator (or any Kopf process with a liveness endpoint) run as a child process against the
sandbox: start it, wait until its liveness probe answers, stop it. Shared by the end-to-end
tests and ``benchmarks/scale.py``."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process has not
    handed out before: the kernel may give the same free port twice in a row, and two servers
    of one process told the same port (an operator's metrics and liveness) make the second
    fail to bind while the first answers for it."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def liveness_url(port: int) -> str:
    """The ``--liveness`` argument Kopf takes, on 127.0.0.1."""
    return f"http://127.0.0.1:{port}/healthz"


def start_live(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    liveness_port: int,
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output appended to ``log``; return once its liveness endpoint
    answers as Kopf's does (a JSON object: not another server on that port). Raise
    RuntimeError with the log's tail if it exits or stays silent."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            list(argv), env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited: {_tail(log)}")
        try:
            with urllib.request.urlopen(liveness_url(liveness_port), timeout=1) as answer:
                live = isinstance(json.loads(answer.read()), dict)
        except (OSError, ValueError):
            live = False
        if live:
            return process
        if time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"not live after {timeout:.0f} s: {_tail(log)}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], *, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _tail(log: Path, characters: int = 2000) -> str:
    return log.read_text(errors="replace")[-characters:]
