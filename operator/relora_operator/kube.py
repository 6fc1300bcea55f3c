"""The few Kubernetes API calls the operator makes itself (Kopf does the watching).

The synchronous kubernetes client runs in worker threads. The client is configured from the
in-cluster service account, else from $KUBECONFIG read at call time.

Reads (`find_migration`, `list_migrations`, `list_jobs`, `list_pods`) return the objects as the
API sends them (plain dicts, camelCase), the same shape as Kopf's bodies. Reconciliations read
the operator's watch-fed cache (relora_operator.cache); these lists correct it after a watch
restart and now and then. Answers the operator does not read are drained, not parsed into
client models (a V1Job or V1Event takes a millisecond or more to build).

The calls go through the client's ApiClient (its configuration, authentication and connection
pool) but not through its generated API classes: `CoreV1Api` and `BatchV1Api` alone add 23 MiB
of resident memory for the eight calls made here. ``_Batch``, ``_Core`` and ``_Custom`` keep the
generated methods' names (the chart's RBAC is derived from them, tests/helm_chart.py).
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
from relora_operator import calls

LOG = logging.getLogger("relora.operator")
Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
WATCH_SECONDS = 300  # the server ends a watch after this; it is then resumed
WATCH_TIMEOUT = (30, WATCH_SECONDS + 30)  # connect, read (the server sends bookmarks meanwhile)
POOL_SIZE = 32  # connections kept: the API calls' threads, and one per watch


class _Rest:
    """One API group's calls: raw answers (urllib3 responses), errors as ApiException."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def _call(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: Any = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            path_params=params,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        answer = self.api.call_api(*request, _request_timeout=timeout)
        if not 200 <= answer.status <= 299:
            answer.read()
            raise ApiException.from_response(http_resp=answer, body=None, data=None)
        return answer.response


class _Batch(_Rest):
    JOBS = "/apis/batch/v1/namespaces/{namespace}/jobs"

    def list_namespaced_job(self, namespace: str, *, label_selector: str) -> Any:
        return self._call(
            "GET", self.JOBS, {"namespace": namespace}, {"labelSelector": label_selector}
        )

    def watch_namespaced_job(self, namespace: str, *, label_selector: str, version: str) -> Any:
        return self._call(
            "GET",
            self.JOBS,
            {"namespace": namespace},
            _watch(label_selector, version),
            timeout=WATCH_TIMEOUT,
        )

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> Any:
        return self._call("POST", self.JOBS, {"namespace": namespace}, body=body)

    def patch_namespaced_job(self, name: str, namespace: str, body: dict[str, Any]) -> Any:
        path, params = self.JOBS + "/{name}", {"namespace": namespace, "name": name}
        return self._call("PATCH", path, params, body=body, content_type=MERGE_PATCH)

    def delete_namespaced_job(self, name: str, namespace: str, body: dict[str, Any]) -> Any:
        path, params = self.JOBS + "/{name}", {"namespace": namespace, "name": name}
        return self._call("DELETE", path, params, body=body)


class _Core(_Rest):
    PODS = "/api/v1/namespaces/{namespace}/pods"

    def list_namespaced_pod(self, namespace: str, *, label_selector: str) -> Any:
        return self._call(
            "GET", self.PODS, {"namespace": namespace}, {"labelSelector": label_selector}
        )

    def watch_namespaced_pod(self, namespace: str, *, label_selector: str, version: str) -> Any:
        return self._call(
            "GET",
            self.PODS,
            {"namespace": namespace},
            _watch(label_selector, version),
            timeout=WATCH_TIMEOUT,
        )

    def read_namespaced_pod_log(self, name: str, namespace: str, **query: Any) -> Any:
        names = {
            "tail_lines": "tailLines",
            "since_seconds": "sinceSeconds",
            "limit_bytes": "limitBytes",
        }
        path, params = self.PODS + "/{name}/log", {"namespace": namespace, "name": name}
        return self._call("GET", path, params, {names[k]: v for k, v in query.items()})

    def create_namespaced_service(self, namespace: str, body: dict[str, Any]) -> Any:
        path = "/api/v1/namespaces/{namespace}/services"
        return self._call("POST", path, {"namespace": namespace}, body=body)

    def create_namespaced_event(self, namespace: str, body: dict[str, Any]) -> Any:
        path = "/api/v1/namespaces/{namespace}/events"
        return self._call("POST", path, {"namespace": namespace}, body=body)


class _Custom(_Rest):
    ITEMS = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}"

    def list_namespaced_custom_object(
        self, namespace: str, *, field_selector: str | None = None
    ) -> Any:
        return self._call(
            "GET", self.ITEMS, {"namespace": namespace}, {"fieldSelector": field_selector}
        )

    def patch_namespaced_custom_object_status(
        self, namespace: str, name: str, body: dict[str, Any]
    ) -> Any:
        path, params = self.ITEMS + "/{name}/status", {"namespace": namespace, "name": name}
        return self._call("PATCH", path, params, body=body, content_type=MERGE_PATCH)


# The API calls' priorities (relora_operator.calls): a new migration's Job first, since the
# time to it is what a user waits for; then the status and the Jobs' patches; reads; events.
CREATE, WRITE, READ, EVENT = range(4)


class Kube:
    def __init__(self, api: Any) -> None:
        self.api = api
        self.calls = calls.Calls()
        self.batch = _Batch(api)
        self.core = _Core(api)
        self.custom = _Custom(api)
        # One event in flight at a time, as client-go's event broadcaster posts them: they
        # are the least urgent calls, and a burst of them held the API calls' threads (and
        # the API server) while new migrations waited for their Jobs.
        self.posting = asyncio.Semaphore(1)

    @classmethod
    def connect(cls) -> Kube:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            config.load_kube_config(config_file=path, client_configuration=configuration)
        configuration.connection_pool_maxsize = POOL_SIZE
        return cls(client.ApiClient(configuration))

    # ------------------------------------------------ blocking: for the watch threads
    def list_children(self, plural: str, namespace: str, *, selector: str) -> tuple[list[Obj], str]:
        """The Jobs or pods (``plural``) of ``selector`` and the list's resourceVersion."""
        call = self.batch.list_namespaced_job if plural == "jobs" else self.core.list_namespaced_pod
        found = json.loads(call(namespace, label_selector=selector).data)
        return found.get("items") or [], str(
            (found.get("metadata") or {}).get("resourceVersion", "")
        )

    def watch_children(self, plural: str, namespace: str, version: str, *, selector: str) -> Any:
        """A watch of Jobs or pods from ``version``: the streaming answer."""
        if plural == "jobs":
            return self.batch.watch_namespaced_job(
                namespace, label_selector=selector, version=version
            )
        return self.core.watch_namespaced_pod(namespace, label_selector=selector, version=version)

    # ------------------------------------------------ the loop's calls (in worker threads)

    async def find_migration(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The AdapterMigration as stored now, or None (a list by name: the RBAC has no get)."""
        response = await self.calls.run(
            READ,
            self.custom.list_namespaced_custom_object,
            namespace,
            field_selector=f"metadata.name={name}",
        )
        items = _items(response)
        return items[0] if items else None

    async def list_migrations(self, namespace: str) -> list[dict[str, Any]]:
        return _items(
            await self.calls.run(READ, self.custom.list_namespaced_custom_object, namespace)
        )

    async def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = await self.calls.run(
            READ, self.batch.list_namespaced_job, namespace, label_selector=selector
        )
        return _items(response)

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = await self.calls.run(
            READ, self.core.list_namespaced_pod, namespace, label_selector=selector
        )
        return _items(response)

    async def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """Create a Job: the Job as stored, or None if it already exists (a restarted operator
        creates no twin)."""

        def create() -> dict[str, Any]:  # read as JSON, not into a V1Job (1.5 ms each)
            return dict(json.loads(self.batch.create_namespaced_job(namespace, body).data))

        try:
            return await self.calls.run(CREATE, create)
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    async def create_service(self, namespace: str, body: dict[str, Any]) -> None:
        """Create a worker group's Service; one that exists already is left as it is."""

        def create() -> None:
            self.core.create_namespaced_service(namespace, body).drain_conn()

        try:
            await self.calls.run(CREATE, create)
        except ApiException as error:
            if error.status != 409:
                raise

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and (in the background) its pods; one already gone is no error."""

        def send() -> None:
            body = {"propagationPolicy": "Background"}
            self.batch.delete_namespaced_job(name, namespace, body).drain_conn()

        try:
            await self.calls.run(WRITE, send)
        except ApiException as error:
            if error.status != 404:
                raise

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        def send() -> None:
            self.batch.patch_namespaced_job(name, namespace, patch).drain_conn()

        await self.calls.run(WRITE, send)

    async def patch_status(
        self, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the status; the migration as stored now (its new resourceVersion)."""
        response = await self.calls.run(
            WRITE,
            self.custom.patch_namespaced_custom_object_status,
            namespace,
            name,
            {"status": status},
        )
        return dict(json.loads(response.data))

    async def pod_log(
        self, namespace: str, pod: str, *, lines: int, since_seconds: int | None, limit_bytes: int
    ) -> str | None:
        """The log's last ``lines`` lines written in the last ``since_seconds`` seconds (all
        when None), at most ``limit_bytes`` of them: "" if there is nothing new or the log
        cannot be read, None if the pod does not exist (any more)."""
        try:
            response = await self.calls.run(
                READ,
                self.core.read_namespaced_pod_log,
                pod,
                namespace,
                tail_lines=lines,
                since_seconds=since_seconds,
                limit_bytes=limit_bytes,
            )
        except ApiException as error:
            return None if error.status == 404 else ""
        return str(response.data.decode(errors="replace"))

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

        def send() -> None:
            self.core.create_namespaced_event(namespace, body).drain_conn()

        try:
            async with self.posting:
                await self.calls.run(EVENT, send)
        except ApiException as error:  # events are best effort: say so, go on
            LOG.warning("event %s on %s not recorded: HTTP %s", reason, name, error.status)


def _watch(selector: str, version: str) -> dict[str, Any]:
    return {
        "labelSelector": selector,
        "watch": "true",
        "resourceVersion": version,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": WATCH_SECONDS,
    }


def _items(response: Any) -> list[dict[str, Any]]:
    """The items of a raw (not deserialized) list response."""
    items = json.loads(response.data).get("items") or []
    return [dict(item) for item in items]
