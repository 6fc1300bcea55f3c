"""Build the batch/v1 Job that migrates one adapter (a pure function of the spec and settings).

With ``spec.distributed`` and a world of more than one process (workers x GPUs per worker):

- one rule for the command: one trainer process per GPU. A worker with one GPU (or none) runs
  the trainer itself, with the torchrun environment set on the pod (RANK from the pod's
  completion index, WORLD_SIZE = workers, LOCAL_RANK 0); a worker with G > 1 GPUs runs it under
  torchrun (``python -m torch.distributed.run --nnodes W --node-rank INDEX --nproc-per-node G``),
  which sets that environment for each of its G processes. The trainer command must therefore
  start with the Python interpreter.
- workers > 1: an Indexed Job (completions = parallelism = workers: Kueue admits the group as
  one workload, all pods at once) and a headless Service (``service``) whose name is the pods'
  subdomain, so that worker 0 is ``<job>-0.<service>`` (MASTER_ADDR) for the others. The Job's
  own backoffLimit is 0: one failed worker fails the Job, and the Job controller stops the
  others; the operator then makes the Job again (the planner's group restart, at most
  spec.backoffLimit times), so that the whole group restarts together from the last checkpoint.
  A Job's per-pod retries would restart the failed worker alone, into a group that no longer
  waits for it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from relora_api import contract, uris
from relora_api.resource import API_VERSION, KIND
from relora_api.spec import MASTER_PORT, Adapter, AdapterMigrationSpec
from relora_operator import naming
from relora_operator.settings import Settings

CONTAINER = "trainer"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # the Job controller sets it in each pod of an Indexed Job


def world(spec: AdapterMigrationSpec) -> tuple[int, int]:
    """(workers, processes per worker) of each adapter's group: (1, 1) without distributed."""
    return spec.workers, spec.processes_per_worker


def master_address(job: str, workers: int) -> str:
    """Where worker 0 listens: its hostname in the Service's subdomain, or this pod."""
    return f"{job}-0.{naming.service_name(job)}" if workers > 1 else "127.0.0.1"


def _distributed(
    container: dict[str, Any], pod_spec: dict[str, Any], spec: AdapterMigrationSpec, job: str
) -> None:
    """Make ``container`` one worker of the adapter's group (see the module's docstring)."""
    workers, processes = world(spec)
    index: dict[str, Any] = (
        {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{naming.INDEX}']"}}}
        if workers > 1
        else {"value": "0"}
    )
    env = [
        {"name": "MASTER_ADDR", "value": master_address(job, workers)},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NODE_RANK", **index},
    ]
    if spec.shards_base:
        env.append({"name": contract.ENV_SHARD_BASE, "value": "1"})
    if processes == 1:
        env += [
            {"name": "RANK", **index},
            {"name": "WORLD_SIZE", "value": str(workers)},
            {"name": "LOCAL_RANK", "value": "0"},
            {"name": "LOCAL_WORLD_SIZE", "value": "1"},
        ]
    else:
        python, *rest = container["command"]
        container["command"] = [
            python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={workers}",
            "--node-rank=$(NODE_RANK)",
            f"--nproc-per-node={processes}",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            *rest,
        ]
    container["env"] = env + container["env"]
    if workers > 1:
        pod_spec["subdomain"] = naming.service_name(job)


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
    workers, processes = world(spec)
    if workers * processes > 1:
        job = naming.job_name(name, adapter.name, uid, workers)
        _distributed(container, pod_spec, spec, job)
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
    restarts: int = 0,
) -> dict[str, Any]:
    """The Job manifest for ``adapter`` of the AdapterMigration ``namespace/name`` (made of the
    spec of ``generation``, if given: a Job of the current generation is not stale; a worker
    group's Job says how many times the group was restarted before it)."""
    template = pod_template(
        name=name, namespace=namespace, uid=uid, spec=spec, adapter=adapter, settings=settings
    )
    labels = naming.job_labels(name, adapter.name, uid, spec.queue_name)
    workers = spec.workers
    job_spec: dict[str, Any] = {
        # A group's retries are the operator's (restarts: see the module's docstring).
        "backoffLimit": spec.backoff_limit if workers == 1 else 0,
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
    if workers > 1:
        job_spec.update(completionMode="Indexed", completions=workers, parallelism=workers)
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    # ttlSecondsAfterFinished is set only once the outcome is recorded in the status.
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": naming.job_name(name, adapter.name, uid, workers),
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                naming.TEMPLATE_HASH: template_hash(template),
                **({naming.GENERATION: str(generation)} if generation is not None else {}),
                **({naming.RESTARTS: str(restarts)} if workers > 1 else {}),
            },
            "ownerReferences": [_owner(name, uid)],
        },
        "spec": job_spec,
    }


def _owner(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_service(
    *, name: str, namespace: str, uid: str, spec: AdapterMigrationSpec, adapter: Adapter
) -> dict[str, Any] | None:
    """The headless Service of ``adapter``'s worker group (None: one worker, no Service).

    It selects the adapter's pods (of whichever Job is current) and publishes them before they
    are ready: worker 0's name resolves as soon as its pod has an address. Owned by the
    migration like the Job, so it goes with it; it outlives a Job made again for a restart."""
    if spec.workers == 1:
        return None
    job = naming.job_name(name, adapter.name, uid, spec.workers)
    labels = naming.job_labels(name, adapter.name, uid, None)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": naming.service_name(job),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [_owner(name, uid)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {naming.MIGRATION_UID: uid, naming.ADAPTER: adapter.name},
            "publishNotReadyAddresses": True,
        },
    }


def template_hash(template: dict[str, Any]) -> str:
    """Identifies a Job's pod template. A Job's pod cannot change, so a spec edit that changes
    the template (method, image, resources, env...) does not reach a Job created before it."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]
