"""Status pieces written by the Job controller, the kubelet and the fault hooks: a condition,
a pod's (only) container status (waiting, running, terminated), and the status write that keeps a
condition's lastTransitionTime while its status stays the same, as controllers do.
"""

from __future__ import annotations

from typing import Any

from relora_sandbox.kinds import Kind
from relora_sandbox.server import Emulator
from relora_sandbox.store import Obj, now


def new_condition(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    condition = {"type": type_, "status": status, "lastTransitionTime": now()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def write_status(emulator: Emulator, kind: Kind, obj: Obj, status: dict[str, Any]) -> None:
    """Write ``status`` unless unchanged; a condition keeps its lastTransitionTime (and
    reason) while its status stays the same, as controllers do."""
    previous = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
    for condition in status.get("conditions") or []:
        old = previous.get(condition["type"])
        if old is not None and old.get("status") == condition.get("status"):
            condition["lastTransitionTime"] = old.get("lastTransitionTime")
    if status == obj.get("status"):
        return
    body = {
        "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
        "status": status,
    }
    emulator.update(
        kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], body, status=True
    )


def container_status(pod: Obj, state: dict[str, Any], *, running: bool = False) -> Obj:
    """The status of a pod's (only) container in ``state`` (running, waiting, terminated)."""
    container = pod["spec"]["containers"][0]
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": running,
        "started": running,
        "restartCount": 0,
        "state": state,
    }


def waiting_status(pod: Obj, reason: str, message: str) -> Obj:
    return container_status(pod, {"waiting": {"reason": reason, "message": message}})


def terminated_status(
    pod: Obj, code: int, reason: str, message: str, started: str, finished: str
) -> Obj:
    terminated = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished}
    if message:
        terminated["message"] = message
    return container_status(pod, {"terminated": terminated})
