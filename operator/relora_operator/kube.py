"""The few Kubernetes API calls the operator makes itself (Kopf does the watching).

The synchronous kubernetes client runs in worker threads. The client is configured from the
in-cluster service account, else from $KUBECONFIG read at call time.

Reads (`find_migration`, `list_jobs`, `list_pods`) return the objects as the API sends them
(plain dicts, camelCase), the same shape as Kopf's bodies. A reconciliation reads what it acts
on here rather than from Kopf's watch caches: after a watch outage Kopf lists again but never
learns what was deleted meanwhile, so a cache can hold objects that are gone.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from relora_api import times
from relora_api.resource import GROUP, KIND, PLURAL, VERSION

LOG = logging.getLogger("relora.operator")


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

    async def find_migration(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The AdapterMigration as stored now, or None (a list by name: the RBAC has no get)."""
        found = await asyncio.to_thread(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
        )
        items = found.get("items") or []
        return dict(items[0]) if items else None

    async def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = await asyncio.to_thread(
            self.batch.list_namespaced_job,
            namespace,
            label_selector=selector,
            _preload_content=False,
        )
        return _items(response)

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = await asyncio.to_thread(
            self.core.list_namespaced_pod,
            namespace,
            label_selector=selector,
            _preload_content=False,
        )
        return _items(response)

    async def create_job(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a Job; False if it already exists (a restarted operator creates no twin)."""

        def create() -> None:  # the answer is drained, not parsed: a V1Job took 1.5 ms per Job
            self.batch.create_namespaced_job(namespace, body, _preload_content=False).drain_conn()

        try:
            await asyncio.to_thread(create)
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
            "firstTimestamp": times.stamp(now),
            "lastTimestamp": times.stamp(now),
            "count": 1,
        }
        try:
            await asyncio.to_thread(self.core.create_namespaced_event, namespace, body)
        except ApiException as error:  # events are best effort: say so, go on
            LOG.warning("event %s on %s not recorded: HTTP %s", reason, name, error.status)


def _items(response: Any) -> list[dict[str, Any]]:
    """The items of a raw (not deserialized) list response."""
    items = json.loads(response.data).get("items") or []
    return [dict(item) for item in items]
