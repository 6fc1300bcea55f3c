"""Build the batch/v1 Job that migrates one adapter (a pure function of the spec and settings)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from relora_api import contract, uris
from relora_api.resource import API_VERSION, KIND
from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_operator import naming
from relora_operator.settings import Settings

CONTAINER = "trainer"


def _claims(spec: AdapterMigrationSpec, adapter: Adapter) -> dict[str, bool]:
    """PVC claims the adapter's migration touches -> whether it writes there."""
    reads = [
        spec.source_model.uri,
        spec.target_model.uri,
        adapter.uri,
        adapter.data.train,
        adapter.data.validation,
        adapter.data.test,
    ]
    claims: dict[str, bool] = {}
    for uri in reads:
        if uri is not None:
            parsed = uris.parse_uri(uri)
            if parsed.scheme == "pvc":
                claims.setdefault(parsed.authority, False)
    output = uris.parse_uri(spec.output.uri)
    if output.scheme == "pvc":
        claims[output.authority] = True
    return claims


def pod_template(
    *,
    name: str,
    namespace: str,
    uid: str,
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    settings: Settings,
) -> dict[str, Any]:
    """The pod template of the Job for ``adapter`` of the AdapterMigration ``namespace/name``:
    all that ``template_hash`` identifies, without the rest of the Job."""
    claims = _claims(spec, adapter)
    mounts = {claim: f"{contract.PVC_MOUNT_ROOT}/{claim}" for claim in claims}
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_MIGRATION, "value": contract.single_adapter_spec(spec, adapter.name)},
        {"name": contract.ENV_ADAPTER, "value": adapter.name},
        {"name": contract.ENV_OWNER, "value": contract.owner(namespace, name, uid)},
        {"name": contract.ENV_PVC_MOUNTS, "value": json.dumps(mounts, sort_keys=True)},
        {"name": contract.ENV_TERMINATION_LOG, "value": contract.TERMINATION_LOG},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [e.to_wire() for e in spec.env or []]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": list(settings.trainer_command),
        "env": env,
        "terminationMessagePath": contract.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
        + [
            {"name": f"pvc-{claim}", "mountPath": mounts[claim], "readOnly": not writes}
            for claim, writes in sorted(claims.items())
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.env_from:
        container["envFrom"] = [e.to_wire() for e in spec.env_from]
    if spec.resources is not None:
        container["resources"] = spec.resources.to_wire()
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}]
        + [
            {"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim}}
            for claim in sorted(claims)
        ],
        # The trainer talks to no API: no token in the pod unless a ServiceAccount is asked for.
        "automountServiceAccountToken": spec.service_account_name is not None,
    }
    optional = {
        "nodeSelector": spec.node_selector,
        "tolerations": [t.to_wire() for t in spec.tolerations] if spec.tolerations else None,
        "affinity": spec.affinity,
        "priorityClassName": spec.priority_class_name,
        "serviceAccountName": spec.service_account_name,
    }
    pod_spec.update({k: v for k, v in optional.items() if v})
    labels = naming.job_labels(name, adapter.name, uid, spec.queue_name)
    return {"metadata": {"labels": dict(labels)}, "spec": pod_spec}


def build_job(
    *,
    name: str,
    namespace: str,
    uid: str,
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    settings: Settings,
    generation: int | None = None,
) -> dict[str, Any]:
    """The Job manifest for ``adapter`` of the AdapterMigration ``namespace/name`` (made of the
    spec of ``generation``, if given: a Job of the current generation is not stale)."""
    template = pod_template(
        name=name, namespace=namespace, uid=uid, spec=spec, adapter=adapter, settings=settings
    )
    labels = naming.job_labels(name, adapter.name, uid, spec.queue_name)
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        # Kueue admits a queued Job by unsuspending it; otherwise we mirror spec.suspend.
        "suspend": spec.suspend or spec.queue_name is not None,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": [contract.EXIT_BAD_INPUT],
                    },
                },
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "template": template,
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    # ttlSecondsAfterFinished is set only once the outcome is recorded in the status.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": naming.job_name(name, adapter.name, uid),
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                naming.TEMPLATE_HASH: template_hash(template),
                **({naming.GENERATION: str(generation)} if generation is not None else {}),
            },
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": job_spec,
    }


def template_hash(template: dict[str, Any]) -> str:
    """Identifies a Job's pod template. A Job's pod cannot change, so a spec edit that changes
    the template (method, image, resources, env...) does not reach a Job created before it."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]
