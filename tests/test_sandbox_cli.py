"""`relora sandbox` as a user runs it: usable with kubectl, stops cleanly, leaves no process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import kubectl_apply, kubectl_binary, python_job


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sandbox_serves_kubectl_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    workdir = tmp_path / "box"
    ports = []
    for _ in range(2):  # the operator's metrics and liveness ports: free ones
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(str(probe.getsockname()[1]))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relora_cli",
            "sandbox",
            "--workdir",
            str(workdir),
            "--metrics-port",
            ports[0],
            "--liveness-port",
            ports[1],
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    banner = process.stdout.readline()
    assert banner.startswith("relora sandbox: Kubernetes API emulator on http://127.0.0.1:")
    kubeconfig = workdir / "kubeconfig"
    kubectl = [kubectl_binary(), f"--kubeconfig={kubeconfig}"]
    pid_file = tmp_path / "pod.pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    job = python_job("sleeper", code)
    try:
        kubectl_apply(kubectl, job)
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the pod never started"
            time.sleep(0.05)
        pod_pid = int(pid_file.read_text())
        assert _pid_alive(pod_pid)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    assert process.returncode == 0
    deadline = time.monotonic() + 5
    while _pid_alive(pod_pid):
        assert time.monotonic() < deadline, "the pod's process outlived the sandbox"
        time.sleep(0.05)
