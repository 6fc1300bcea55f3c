"""The sandbox's own fault hooks used by the fault-injection suite: an API server restart, and
garbage collection that leaves an orphaned pod alone."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

from kubernetes import client, watch

from relora_sandbox.server import Emulator
from tests.conftest import untyped, wait_for


def test_a_restart_drops_every_connection_and_keeps_the_store(
    sandbox: Any, api: Any, namespace: str
) -> None:
    core = untyped(client.CoreV1Api(api))
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "before"}})
    listed = core.list_namespaced_config_map(namespace)
    seen: list[str] = []
    ended = threading.Event()

    def follow() -> None:  # a watch open across the restart ends with it
        stream = watch.Watch().stream(
            core.list_namespaced_config_map,
            namespace,
            resource_version=listed.metadata.resource_version,
            timeout_seconds=60,
        )
        for event in stream:
            seen.append(event["object"].metadata.name)
        ended.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    port = sandbox.port
    request = urllib.request.Request(
        f"{sandbox.url}/sandbox/v1/restart",
        data=json.dumps({"downSeconds": 1.0}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 202

    def refused() -> bool:
        try:
            urllib.request.urlopen(f"{sandbox.url}/version", timeout=1).close()
        except urllib.error.URLError as error:
            return isinstance(error.reason, ConnectionRefusedError)
        return False

    wait_for(refused, timeout=5, what="the port refusing connections")
    wait_for(ended.is_set, timeout=5, what="the open watch to end")
    wait_for(lambda: not refused(), timeout=10, what="the API served again")
    assert sandbox.port == port
    names = [c.metadata.name for c in core.list_namespaced_config_map(namespace).items]
    assert names == ["before"], "the objects outlive the restart"
    # A watch resumes from the last version it saw, as after any dropped connection.
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "after"}})
    stream = watch.Watch().stream(
        core.list_namespaced_config_map,
        namespace,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=2,
    )
    assert [e["object"].metadata.name for e in stream] == ["after"]
    assert seen == []


def test_the_garbage_collectors_late_look_sees_the_owners_of_now() -> None:
    """A new object gets a delayed dangling-owner check (0.2 s) with the copy made at creation.
    An object orphaned meanwhile (its Job deleted with the API's default for Jobs, propagation
    Orphan) must stay; one whose owner never existed must go."""
    emulator = Emulator()
    maps = emulator.kind("", "v1", "configmaps")
    owner, _ = emulator.create(maps, "default", {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner"}
    orphan, _ = emulator.create(
        maps,
        "default",
        {
            "metadata": {
                "name": "orphan",
                "ownerReferences": [{**reference, "uid": owner["metadata"]["uid"]}],
            }
        },
    )
    dangling, _ = emulator.create(
        maps,
        "default",
        {"metadata": {"name": "dangling", "ownerReferences": [{**reference, "uid": "never"}]}},
    )
    emulator.delete(maps, "default", "owner", "Orphan")
    emulator.store.collect_dangling(maps, orphan)
    emulator.store.collect_dangling(maps, dangling)
    kept = emulator.store.find(maps, "default", "orphan")
    assert kept is not None and not kept["metadata"].get("ownerReferences")
    assert emulator.store.find(maps, "default", "dangling") is None


def test_a_dangling_job_goes_with_its_pods() -> None:
    """A Job whose owner is gone (created by a client that had not heard of the deletion) is
    collected in the background, as the garbage collector does: its pods go too, though a
    client's delete of a Job orphans them by default."""
    emulator = Emulator()
    jobs, pods = emulator.kind("batch", "v1", "jobs"), emulator.kind("", "v1", "pods")
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "never"}
    job, _ = emulator.create(
        jobs,
        "default",
        {
            "metadata": {"name": "late", "ownerReferences": [owner]},
            "spec": {
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}
                }
            },
        },
    )
    mine = {"apiVersion": "batch/v1", "kind": "Job", "name": "late", "controller": True}
    emulator.create(
        pods,
        "default",
        {
            "metadata": {
                "name": "late-pod",
                "ownerReferences": [{**mine, "uid": job["metadata"]["uid"]}],
            },
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        },
    )
    emulator.store.collect_dangling(jobs, job)
    assert emulator.store.find(jobs, "default", "late") is None
    assert emulator.store.find(pods, "default", "late-pod") is None
