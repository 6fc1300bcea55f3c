"""The sandbox's own HTTP routes, beside the Kubernetes API: every one is added here.

- POST /sandbox/v1/faults {"effect": "Unschedulable" | "ImagePullBackOff", "labelSelector",
  "image"}: add a fault (relora_sandbox.faults); DELETE /sandbox/v1/faults: clear them;
- POST /sandbox/v1/kill {"namespace", "pod", "reason"}: kill a running pod as a disruption
  would (DisruptionTarget condition);
- POST /sandbox/v1/watches/close: end every open watch (a dropped connection);
- POST /sandbox/v1/history/compact: forget the event history (older watches get 410 Gone);
- POST /sandbox/v1/restart {"downSeconds": N}: restart the API server just after answering.

The emulator serves them before its Kubernetes routes (Emulator.admin); the pods' logs
(GET .../pods/NAME/log) come from the kubelet (Emulator.log_source).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web

from relora_sandbox.faults import Fault

if TYPE_CHECKING:
    from relora_sandbox.jobs import JobRunner
    from relora_sandbox.sandbox import Sandbox
    from relora_sandbox.store import Store


def register_routes(sandbox: Sandbox) -> None:
    """Serve the sandbox's routes and its pods' logs from its emulator."""
    emulator, jobs = sandbox.emulator, sandbox.jobs
    emulator.log_source = jobs.kubelet.logs
    emulator.log_age = jobs.kubelet.log_age
    emulator.admin.update(
        {
            ("POST", "/sandbox/v1/faults"): partial(_add_fault, jobs),
            ("DELETE", "/sandbox/v1/faults"): partial(_clear_faults, jobs),
            ("POST", "/sandbox/v1/kill"): partial(_kill, jobs),
            ("POST", "/sandbox/v1/watches/close"): partial(_close_watches, emulator.store),
            ("POST", "/sandbox/v1/history/compact"): partial(_compact, emulator.store),
            ("POST", "/sandbox/v1/restart"): partial(_restart, sandbox),
        }
    )


async def _add_fault(jobs: JobRunner, request: web.Request) -> web.StreamResponse:
    body = await request.json()
    jobs.add_fault(Fault(body["effect"], body.get("labelSelector", ""), body.get("image", "")))
    return web.json_response({"faults": len(jobs.faults)})


async def _clear_faults(jobs: JobRunner, request: web.Request) -> web.StreamResponse:
    jobs.clear_faults()
    return web.json_response({"faults": 0})


async def _kill(jobs: JobRunner, request: web.Request) -> web.StreamResponse:
    body = await request.json()
    killed = jobs.kill(
        body["namespace"], body["pod"], reason=body.get("reason", "PreemptionByScheduler")
    )
    return web.json_response({"killed": killed}, status=200 if killed else 404)


async def _close_watches(store: Store, request: web.Request) -> web.StreamResponse:
    store.close_watches()
    return web.json_response({"closed": True})


async def _compact(store: Store, request: web.Request) -> web.StreamResponse:
    store.compact()
    return web.json_response({"compacted": store.compacted})


async def _restart(sandbox: Sandbox, request: web.Request) -> web.StreamResponse:
    """POST /sandbox/v1/restart {"downSeconds": N}: restart just after answering."""
    body = await request.json() if request.can_read_body else {}
    down = float((body or {}).get("downSeconds", 1.0))
    sandbox.restart_soon(down)
    return web.json_response({"restarting": True, "downSeconds": down}, status=202)
