"""Kopf runs against the emulator: create, update and delete with a finalizer, no retries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.conftest import untyped, wait_for

OPERATOR = Path(__file__).parent / "kopf_sample" / "sample_operator.py"
GROUP, VERSION, PLURAL = "sandbox.relora.dev", "v1", "samples"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": "Sample", "plural": PLURAL, "singular": "sample"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"value": {"type": "integer"}},
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "seen": {"type": "integer"},
                                    "handler": {"type": "string"},
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_kopf_lifecycle_with_finalizers(
    api: Any, kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    extensions = untyped(client.ApiextensionsV1Api(api))
    try:
        extensions.create_custom_resource_definition(CRD)
    except ApiException as error:
        assert error.status == 409
    custom = untyped(client.CustomObjectsApi(api))
    args = (GROUP, VERSION, namespace, PLURAL)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    argv = ["run", "--standalone", "--namespace", namespace, "--verbose", str(OPERATOR)]
    # A registry of its own: only the sample's handlers (not those of modules other tests
    # imported into this process, such as relora_operator.handlers).
    with KopfRunner(argv, timeout=60, registry=kopf.OperatorRegistry()) as runner:
        custom.create_namespaced_custom_object(
            *args,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "Sample",
                "metadata": {"name": "s1"},
                "spec": {"value": 1},
            },
        )
        wait_for(
            lambda: (
                custom.get_namespaced_custom_object(*args, "s1").get("status", {}).get("seen") == 1
            )
        )
        held = custom.get_namespaced_custom_object(*args, "s1")
        assert held["metadata"]["finalizers"] == [f"{GROUP}/finalizer"]
        custom.patch_namespaced_custom_object(*args, "s1", {"spec": {"value": 2}})
        wait_for(lambda: custom.get_namespaced_custom_object(*args, "s1")["status"]["seen"] == 2)
        assert custom.get_namespaced_custom_object(*args, "s1")["status"]["handler"] == "update"
        custom.delete_namespaced_custom_object(*args, "s1")

        def gone() -> bool:
            try:
                custom.get_namespaced_custom_object(*args, "s1")
            except ApiException as error:
                return bool(error.status == 404)
            return False

        wait_for(gone)
    assert runner.exception is None and runner.exit_code == 0
    output = runner.output
    assert "cleaned up after s1" in output
    # KopfRunner runs Kopf in a thread, which Kopf rightly warns about; nothing else may warn.
    expected = "OS signals are ignored: running not in the main thread."
    for line in output.splitlines():
        if expected not in line:
            assert "[WARNING" not in line and "[ERROR" not in line, line
    for symptom in ("failed temporarily", "will retry", "Traceback", "Gone"):
        assert symptom not in output, symptom
    # A 410 answer in the server's access log (not the digits in an ephemeral port: 127.0.0.1:41051)
    assert not re.search(r'HTTP/1\.[01]" 410 ', output), "a watch expired (410 Gone)"
    for handler in ("created", "updated", "deleted"):
        assert output.count(f"Handler '{handler}' succeeded") == 1, handler
