"""Fault injection: keep matching pods Pending Unschedulable, fail their image pull, kill a
running pod with a DisruptionTarget condition. From Python (the Job runner's add_fault,
clear_faults and kill) or over HTTP (POST /sandbox/v1/..., see relora_sandbox.routes).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relora_sandbox.selectors import label_matcher
from relora_sandbox.status import new_condition, waiting_status
from relora_sandbox.store import Obj

if TYPE_CHECKING:
    from relora_sandbox.kubelet import Kubelet


@dataclass
class Fault:
    """Pods matching ``label_selector`` (and ``image``, if set) get ``effect``."""

    effect: str  # Unschedulable | ImagePullBackOff
    label_selector: str = ""
    image: str = ""

    def matches(self, pod: Obj) -> bool:
        images = [c.get("image", "") for c in pod["spec"].get("containers", [])]
        if self.image and self.image not in images:
            return False
        return label_matcher(self.label_selector)(pod)


class FaultHooks:
    """The Job runner's fault hooks: its ``faults`` hold the pods they match at admission (see
    ``faulted``), ``kill`` stops a running pod as a disruption would."""

    faults: list[Fault]
    kubelet: Kubelet
    _dirty: asyncio.Event

    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)
        self._dirty.set()

    def clear_faults(self) -> None:
        self.faults.clear()
        self._dirty.set()

    def kill(self, namespace: str, pod: str, *, reason: str = "PreemptionByScheduler") -> bool:
        """Kill a running pod as a disruption would (DisruptionTarget condition, exit 137)."""
        running = self.kubelet.running.get((namespace, pod))
        if running is None:
            return False
        running.disruption = reason
        self.kubelet.kill_process((namespace, pod), keep=True)
        return True


def faulted(status: Obj, fault: Fault, pod: Obj) -> Obj:
    """``status`` of a Pending ``pod`` that ``fault`` holds."""
    if fault.effect == "Unschedulable":
        status["conditions"] = [
            new_condition(
                "PodScheduled",
                "False",
                "Unschedulable",
                "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes "
                "are available: 1 No preemption victims found for incoming pod.",
            )
        ]
        return status
    image = pod["spec"]["containers"][0].get("image", "")
    status["conditions"] = [new_condition("PodScheduled", "True")]
    status["containerStatuses"] = [
        waiting_status(pod, "ImagePullBackOff", f'Back-off pulling image "{image}"')
    ]
    return status


def disruption_target(reason: str) -> dict[str, Any]:
    """The condition of a pod that ``FaultHooks.kill`` killed."""
    return new_condition(
        "DisruptionTarget",
        "True",
        reason,
        "the pod was killed by the sandbox's fault injection",
    )
