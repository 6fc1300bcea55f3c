"""The few Kubernetes API calls the operator makes itself (Kopf does the watching).

The synchronous kubernetes client runs in worker threads. The client is configured from the
in-cluster service account, else from $KUBECONFIG read at call time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from relora_operator.api.resource import GROUP, KIND, PLURAL, VERSION


class Kube:
    def __init__(self, api: Any) -> None:
        self.api = api
        self.batch: Any = client.BatchV1Api(api)
        self.core: Any = client.CoreV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)

    @classmethod
    def connect(cls) -> Kube:
        try:
            config.load_incluster_config()
            return cls(client.ApiClient())
        except config.ConfigException:
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            return cls(config.new_client_from_config(config_file=path))

    async def create_job(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a Job; False if it already exists (a restarted operator creates no twin)."""
        try:
            await asyncio.to_thread(self.batch.create_namespaced_job, namespace, body)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await asyncio.to_thread(self.batch.patch_namespaced_job, name, namespace, patch)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
        )

    async def pod_log_tail(self, namespace: str, pod: str, lines: int) -> str:
        try:
            text: str = await asyncio.to_thread(
                self.core.read_namespaced_pod_log, pod, namespace, tail_lines=lines
            )
        except ApiException:
            return ""
        return text

    async def event(
        self, namespace: str, name: str, uid: str, kind: str, reason: str, message: str
    ) -> None:
        now = datetime.datetime.now(datetime.UTC)
        body = {
            "metadata": {"generateName": f"{name}."},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "relora-operator"},
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "count": 1,
        }
        with contextlib.suppress(ApiException):  # events are best effort
            await asyncio.to_thread(self.core.create_namespaced_event, namespace, body)
