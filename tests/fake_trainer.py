"""A fast stand-in for the trainer Job entrypoint, for operator fault tests.

It follows the trainer contract (relora_api.contract) without any ML stack:

- progress: one JSON line ``{"event": "progress", ...}`` on stdout per step;
- outcome: a compact JSON ``Outcome`` in the file named by RELORA_TERMINATION_LOG;
- exit code: 0 (finished), 3 (bad input, never retried) or anything else (retried).

The test holds it in the "running" phase: each attempt writes the spec it got as
``CONTROL/ADAPTER/POD.spec.json`` and its pid as ``POD.pid`` (the test counts attempts and can
check the process), then waits for ``CONTROL/ADAPTER/release``, whose content says how to end:
``ready`` (default), ``not-ready``, ``bad-input`` (exit 3) or ``crash`` (exit 1, and the release
is used up: the retry waits for a new one). CONTROL is $FAKE_TRAINER_CONTROL. Standard library
only: it starts in ~30 ms.

A worker of a group (WORLD_SIZE > 1, the torchrun environment the operator sets) also writes
``POD.world.json`` (its RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and meets the others as
torch.distributed would: rank 0 listens on MASTER_ADDR:MASTER_PORT and every other rank
connects and says its rank; rank 0 writes the ranks it met to ``POD.group.json``. Only rank 0
reports the outcome (its termination message); the others end with exit code 0.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

GIVE_UP_SECONDS = 300.0  # never outlive a test run even if nobody releases it


def _outcome(text: str) -> None:
    path = os.environ.get("RELORA_TERMINATION_LOG", "/dev/termination-log")
    Path(path).write_text(text)


def _meet(rank: int, world: int) -> list[int]:
    """The rendezvous: the ranks rank 0 met (rank 0), or [] (the others, once connected)."""
    address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    deadline = time.monotonic() + 60
    if rank == 0:
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(address)
            server.listen(world)
            server.settimeout(60)
            met = [0]
            while len(met) < world:
                connection, _ = server.accept()
                with connection:
                    met.append(int(connection.recv(16).decode()))
            return sorted(met)
    while True:
        try:
            with socket.create_connection(address, timeout=5) as connection:
                connection.sendall(str(rank).encode())
                return []
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> int:
    adapter = os.environ["RELORA_ADAPTER"]
    spec = json.loads(os.environ["RELORA_MIGRATION"])
    assert [a["name"] for a in spec["adapters"]] == [adapter], "one adapter per trainer pod"
    folder = Path(os.environ["FAKE_TRAINER_CONTROL"]) / adapter
    folder.mkdir(parents=True, exist_ok=True)
    pod = os.environ.get("HOSTNAME", "pod")
    (folder / f"{pod}.spec.json").write_text(json.dumps(spec))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX")
        seen = {k: os.environ.get(k) for k in names}
        (folder / f"{pod}.world.json").write_text(json.dumps(seen))
        met = _meet(rank, world)
        if rank == 0:
            (folder / f"{pod}.group.json").write_text(json.dumps(met))
    (folder / f"{pod}.pid").write_text(str(os.getpid()))
    release = folder / "release"
    deadline = time.monotonic() + GIVE_UP_SECONDS
    step = 0
    while not release.exists():
        if time.monotonic() > deadline:
            return 1
        step += 1
        record = {"event": "progress", "adapter": adapter, "stage": "finetune"}
        print(json.dumps({**record, "step": step, "maxSteps": 1000}), flush=True)
        time.sleep(0.1)
    action = release.read_text().strip() or "ready"
    if action == "bad-input":
        message = "spec.adapters[0].uri: adapter_model.safetensors is truncated"
        _outcome(json.dumps({"kind": "error", "reason": "InvalidAdapter", "message": message}))
        return 3
    if action == "crash":  # once: the retry waits for a new release
        release.unlink()
        _outcome(json.dumps({"kind": "error", "reason": "InternalError", "message": "boom"}))
        return 1
    if rank != 0:
        return 0
    ready = action == "ready"
    spec = json.loads(os.environ["RELORA_MIGRATION"])
    result = {
        "ready": ready,
        "strategy": spec.get("method", {}).get("strategy", "relora"),
        "outputUri": f"{spec['output']['uri'].rstrip('/')}/{adapter}",
        "metric": "accuracy",
        "target": 0.9,
        "qualitySource": 0.95,
        "qualityBefore": 0.6,
        "qualityAfter": 0.93 if ready else 0.7,
        "steps": step,
        "timeToReadinessSeconds": 1.5 if ready else None,
    }
    kept = {k: v for k, v in result.items() if v is not None}
    _outcome(json.dumps({"kind": "result", "result": kept}))
    print(json.dumps({"event": "progress", "adapter": adapter, "stage": "saving"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
