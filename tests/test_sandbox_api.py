"""Conformance of the API emulator, through the real kubernetes Python client.

The tests that use only standard API behaviour take the cluster from the `api` fixture, so they
also run against a real cluster when RELORA_E2E_KUBECONFIG is set; those that need the
emulator's hooks (history compaction) use the `sandbox` fixture directly.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.conftest import ROOT, untyped, wait_for

CRD = yaml.safe_load((ROOT / "crds" / "adaptermigrations.relora.dev.yaml").read_text())
GROUP, VERSION, PLURAL = "relora.dev", "v1alpha1", "adaptermigrations"


@pytest.fixture(scope="module")
def crd(api: Any) -> None:
    extensions = untyped(client.ApiextensionsV1Api(api))
    try:
        extensions.create_custom_resource_definition(CRD)
    except ApiException as error:
        if error.status != 409:
            raise
    for _ in range(50):  # a real API server takes a moment to serve a new CRD
        try:
            untyped(client.CustomObjectsApi(api)).list_cluster_custom_object(GROUP, VERSION, PLURAL)
            return
        except ApiException:
            time.sleep(0.1)


def _migration(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterMigration",
        "metadata": {"name": name},
        "spec": {
            "sourceModel": {"uri": "hf://org/v1"},
            "targetModel": {"uri": "hf://org/v2"},
            "adapters": [
                {"name": "a", "uri": "pvc://adapters/a", "data": {"train": "t", "validation": "v"}}
            ],
            "output": {"uri": "pvc://out/x"},
        },
    }


def _error(call: Any, *args: Any, **kwargs: Any) -> ApiException:
    with pytest.raises(ApiException) as caught:
        call(*args, **kwargs)
    return caught.value


def test_discovery_lists_core_groups_and_served_crds(api: Any, crd: None) -> None:
    versions = untyped(client.CoreApi(api)).get_api_versions()
    assert "v1" in versions.versions
    groups = {g.name for g in untyped(client.ApisApi(api)).get_api_versions().groups}
    assert {"batch", "apiextensions.k8s.io", GROUP} <= groups
    resources = untyped(client.CustomObjectsApi(api)).get_api_resources(GROUP, VERSION)
    entries = {r.name: r for r in resources.resources}
    assert entries[PLURAL].short_names == ["am"] and entries[PLURAL].namespaced
    assert f"{PLURAL}/status" in entries


def test_create_sets_identity_and_refuses_duplicates(api: Any, namespace: str) -> None:
    core = untyped(client.CoreV1Api(api))
    created = core.create_namespaced_config_map(namespace, {"metadata": {"name": "one"}})
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert int(created.metadata.resource_version) > 0
    generated = core.create_namespaced_config_map(namespace, {"metadata": {"generateName": "g-"}})
    assert generated.metadata.name.startswith("g-") and len(generated.metadata.name) == 7
    assert (
        _error(core.create_namespaced_config_map, namespace, {"metadata": {"name": "one"}}).status
        == 409
    )
    missing = _error(core.create_namespaced_config_map, "no-such-ns", {"metadata": {"name": "x"}})
    assert missing.status == 404


def test_updates_bump_resource_version_and_stale_writes_conflict(api: Any, namespace: str) -> None:
    core = untyped(client.CoreV1Api(api))
    first = core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "c"}, "data": {"a": "1"}}
    )
    second = core.patch_namespaced_config_map("c", namespace, {"data": {"a": "2"}})
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    stale = {"metadata": {"name": "c", "resourceVersion": first.metadata.resource_version}}
    assert _error(core.replace_namespaced_config_map, "c", namespace, stale).status == 409


def test_generation_moves_with_spec_only_and_status_is_isolated(
    api: Any, crd: None, namespace: str
) -> None:
    custom = untyped(client.CustomObjectsApi(api))
    args = (GROUP, VERSION, namespace, PLURAL)
    created = custom.create_namespaced_custom_object(
        *args, {**_migration("m"), "status": {"phase": "Running"}}
    )
    assert created["metadata"]["generation"] == 1 and "status" not in created
    labelled = custom.patch_namespaced_custom_object(
        *args, "m", {"metadata": {"labels": {"x": "y"}}}
    )
    assert labelled["metadata"]["generation"] == 1
    status = custom.patch_namespaced_custom_object_status(
        *args, "m", {"status": {"phase": "Running"}, "spec": {"suspend": True}}
    )
    assert status["status"] == {"phase": "Running"} and "suspend" not in status["spec"]
    assert status["metadata"]["generation"] == 1
    main = custom.patch_namespaced_custom_object(
        *args, "m", {"spec": {"suspend": True}, "status": {"phase": "Failed"}}
    )
    assert main["metadata"]["generation"] == 2
    assert main["spec"]["suspend"] is True and main["status"] == {"phase": "Running"}


def test_schema_validation_pruning_and_cel(api: Any, crd: None, namespace: str) -> None:
    custom = untyped(client.CustomObjectsApi(api))
    args = (GROUP, VERSION, namespace, PLURAL)
    bad = _migration("bad")
    bad["spec"]["backoffLimit"] = "three"
    bad["spec"]["adapters"][0]["uri"] = "pvc://adapters/../../etc"
    error = _error(custom.create_namespaced_custom_object, *args, bad)
    assert error.status == 422
    causes = {c["field"]: c["message"] for c in json.loads(str(error.body))["details"]["causes"]}
    assert "must be of type integer" in causes["spec.backoffLimit"]
    assert causes["spec.adapters[0].uri"] == "must not contain '..' path segments"
    extra = _migration("extra")
    extra["spec"]["unknownField"] = 1
    created = custom.create_namespaced_custom_object(*args, extra)
    assert "unknownField" not in created["spec"], "unknown fields are pruned"
    changed = {"spec": {"targetModel": {"uri": "hf://org/v3"}}}
    error = _error(custom.patch_namespaced_custom_object, *args, "extra", changed)
    assert error.status == 422 and "targetModel is immutable" in str(error.body)


def test_patch_flavours(api: Any, namespace: str) -> None:
    apps = untyped(client.AppsV1Api(api))
    deployment = {
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {
                    "containers": [{"name": "one", "image": "x"}, {"name": "two", "image": "y"}]
                },
            },
        },
    }
    apps.create_namespaced_deployment(namespace, deployment)
    # strategic merge (the client's default for dicts): containers merge by name
    patched = apps.patch_namespaced_deployment(
        "d",
        namespace,
        {"spec": {"template": {"spec": {"containers": [{"name": "two", "image": "z"}]}}}},
    )
    images = [(c.name, c.image) for c in patched.spec.template.spec.containers]
    assert images == [("one", "x"), ("two", "z")]
    # JSON patch: a failed test operation is 422
    operations = [{"op": "test", "path": "/metadata/name", "value": "other"}]
    error = _error(apps.patch_namespaced_deployment, "d", namespace, operations)
    assert error.status == 422
    replaced = apps.patch_namespaced_deployment(
        "d", namespace, [{"op": "add", "path": "/spec/replicas", "value": 3}]
    )
    assert replaced.spec.replicas == 3


def test_strategic_merge_is_refused_for_custom_resources(sandbox: Any, crd: None) -> None:
    http = urllib3.PoolManager()
    response = http.request(
        "PATCH",
        f"{sandbox.url}/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/x",
        body=b"{}",
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    assert response.status in (404, 415)


def test_label_and_field_selectors(api: Any, namespace: str) -> None:
    core = untyped(client.CoreV1Api(api))
    for name, tier in (("a", "gpu"), ("b", "cpu"), ("c", "gpu")):
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": name, "labels": {"tier": tier}}}
        )

    def names(**selectors: str) -> list[str]:
        listed = core.list_namespaced_config_map(namespace, **selectors).items
        return sorted(i.metadata.name for i in listed)

    assert names(label_selector="tier=gpu") == ["a", "c"]
    assert names(label_selector="tier in (cpu),tier!=gpu") == ["b"]
    assert names(label_selector="!tier") == [n for n in names() if n not in ("a", "b", "c")]
    assert names(field_selector="metadata.name=b") == ["b"]


def test_watch_replays_from_a_resource_version_and_follows(api: Any, namespace: str) -> None:
    core = untyped(client.CoreV1Api(api))
    start = core.list_namespaced_config_map(namespace).metadata.resource_version
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "w"}})
    core.patch_namespaced_config_map("w", namespace, {"data": {"k": "v"}})
    core.delete_namespaced_config_map("w", namespace)
    events = watch.Watch().stream(
        core.list_namespaced_config_map, namespace, resource_version=start, timeout_seconds=2
    )
    seen = [(e["type"], e["object"].metadata.name) for e in events]
    assert seen == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]


def test_watch_from_a_compacted_version_is_gone(sandbox: Any, api: Any, namespace: str) -> None:
    core = untyped(client.CoreV1Api(api))
    old = core.create_namespaced_config_map(namespace, {"metadata": {"name": "x"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "y"}})
    sandbox.thread.call(sandbox.emulator.store.compact)  # the history after x is gone
    http = urllib3.PoolManager()
    response = http.request(
        "GET",
        f"{sandbox.url}/api/v1/namespaces/{namespace}/configmaps?watch=1&resourceVersion="
        f"{old.metadata.resource_version}&timeoutSeconds=1",
    )
    (line,) = response.data.decode().splitlines()
    event = json.loads(line)
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


def test_watch_sends_bookmarks_when_asked(sandbox: Any, namespace: str) -> None:
    http = urllib3.PoolManager()
    response = http.request(
        "GET",
        f"{sandbox.url}/api/v1/namespaces/{namespace}/configmaps?watch=1&resourceVersion=0"
        "&allowWatchBookmarks=true&timeoutSeconds=1",
    )
    types = [json.loads(line)["type"] for line in response.data.decode().splitlines()]
    assert "BOOKMARK" in types


def test_a_burst_reaches_a_watch_in_one_write_and_a_close_after_it(
    sandbox: Any, namespace: str
) -> None:
    """Events queued while a watch waited go out together (one chunk), not one turn of the
    emulator's loop each (under load a watch fell seconds behind its store); a close queued
    after them (fault injection) still lets them through, then ends the stream."""
    store = sandbox.emulator.store
    watching = sandbox.thread.call(lambda: len(store.watches))
    http = urllib3.PoolManager()
    response = http.request(
        "GET",
        f"{sandbox.url}/api/v1/namespaces/{namespace}/configmaps?watch=1&timeoutSeconds=30",
        preload_content=False,
    )
    wait_for(lambda: sandbox.thread.call(lambda: len(store.watches)) > watching)
    configmaps = sandbox.emulator.kind("", "v1", "configmaps")

    def burst() -> None:  # in one callback of the loop: all of it is queued before any write
        for i in range(20):
            sandbox.emulator.create(configmaps, namespace, {"metadata": {"name": f"b{i}"}})
        store.close_watches()

    sandbox.thread.call(burst)
    chunks = [chunk for chunk in response.read_chunked() if chunk.strip()]
    names = [
        json.loads(line)["object"]["metadata"]["name"] for line in b"".join(chunks).splitlines()
    ]
    assert names == [f"b{i}" for i in range(20)]
    assert len(chunks) == 1


def test_finalizers_hold_deletion_until_removed(api: Any, namespace: str) -> None:
    core = untyped(client.CoreV1Api(api))
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "f", "finalizers": ["x.dev/hold"]}}
    )
    core.delete_namespaced_config_map("f", namespace)
    held = core.read_namespaced_config_map("f", namespace)
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("f", namespace, {"metadata": {"finalizers": None}})
    assert _error(core.read_namespaced_config_map, "f", namespace).status == 404


def _owned(core: Any, namespace: str) -> str:
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}}
    )
    return str(owner.metadata.uid)


def _exists(core: Any, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_config_map(name, namespace)
    except ApiException as error:
        assert error.status == 404
        return False
    return True


@pytest.mark.parametrize("policy", ["Background", "Foreground", "Orphan"])
def test_garbage_collection(api: Any, namespace: str, policy: str) -> None:
    core = untyped(client.CoreV1Api(api))
    _owned(core, namespace)
    core.delete_namespaced_config_map("owner", namespace, propagation_policy=policy)
    wait_for(lambda: not _exists(core, namespace, "owner"))
    if policy == "Orphan":
        child = core.read_namespaced_config_map("child", namespace)
        assert not child.metadata.owner_references
    else:
        wait_for(lambda: not _exists(core, namespace, "child"))


def test_a_foreground_deletion_waits_for_a_held_dependent(
    sandbox: Any, api: Any, namespace: str
) -> None:
    """The owner stays (terminating) while its dependent's finalizer holds it, and goes with
    it; the store's indexes of live and waiting objects (kept on each write instead of a scan
    of every object per write) say the same as a scan."""
    core = untyped(client.CoreV1Api(api))
    _owned(core, namespace)
    hold = {"metadata": {"finalizers": ["x.dev/hold"]}}
    core.patch_namespaced_config_map("child", namespace, hold)
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Foreground")
    store = sandbox.emulator.store

    def indexed() -> tuple[bool, int]:
        scanned = {obj["metadata"]["uid"] for _, obj in store.all_objects()}
        return store.live == scanned, len(store.waiting)

    assert core.read_namespaced_config_map("owner", namespace).metadata.deletion_timestamp
    assert core.read_namespaced_config_map("child", namespace).metadata.deletion_timestamp
    assert sandbox.thread.call(indexed) == (True, 1)
    core.patch_namespaced_config_map("child", namespace, {"metadata": {"finalizers": None}})
    wait_for(lambda: not _exists(core, namespace, "owner"))
    assert not _exists(core, namespace, "child")
    assert sandbox.thread.call(indexed) == (True, 0)


def test_deleting_a_namespace_deletes_its_objects(api: Any) -> None:
    core = untyped(client.CoreV1Api(api))
    core.create_namespace({"metadata": {"name": "doomed-ns"}})
    core.create_namespaced_config_map("doomed-ns", {"metadata": {"name": "x"}})
    core.delete_namespace("doomed-ns")
    wait_for(lambda: "doomed-ns" not in [n.metadata.name for n in core.list_namespace().items])


def test_concurrent_watchers_all_see_every_event(api: Any, namespace: str) -> None:
    core = untyped(client.CoreV1Api(api))
    start = core.list_namespaced_config_map(namespace).metadata.resource_version
    seen: list[list[str]] = [[], []]

    def follow(index: int) -> None:
        for event in watch.Watch().stream(
            core.list_namespaced_config_map, namespace, resource_version=start, timeout_seconds=2
        ):
            seen[index].append(event["object"].metadata.name)

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for i in range(5):
        core.create_namespaced_config_map(namespace, {"metadata": {"name": f"n{i}"}})
    for thread in threads:
        thread.join()
    assert seen[0] == seen[1] == [f"n{i}" for i in range(5)]


def test_the_sandbox_writes_a_usable_kubeconfig(sandbox: Any) -> None:
    config = yaml.safe_load(Path(sandbox.kubeconfig_path).read_text())
    assert config["clusters"][0]["cluster"]["server"] == sandbox.url
