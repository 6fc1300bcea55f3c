"""The floor of benchmarks/scale.py: a plain Kopf operator that only creates the Job.

One ``@kopf.on.create`` handler per AdapterMigration, one batch/v1 Job per adapter, owned by the
migration (``kopf.adopt``), running the same trainer stand-in as the real operator gets
($RELORA_TRAINER_COMMAND). Kopf's default settings: no status, no events of its own, no watch
of Jobs or pods. Run with ``kopf run --standalone benchmarks/floor_operator.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import kopf
from kubernetes import client, config

GROUP, VERSION, PLURAL = "relora.dev", "v1alpha1", "adaptermigrations"


@kopf.on.startup()
def configure(memo: kopf.Memo, **_: Any) -> None:
    config.load_kube_config()
    memo["batch"] = client.BatchV1Api()
    memo["command"] = json.loads(os.environ["RELORA_TRAINER_COMMAND"])


@kopf.on.create(GROUP, VERSION, PLURAL)
def create_jobs(
    spec: kopf.Spec, name: str, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:
    for adapter in spec.get("adapters", []):
        job: dict[str, Any] = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": f"{name}-{adapter['name']}"[:63].rstrip("-"),
                "labels": {"relora.dev/migration": name, "relora.dev/adapter": adapter["name"]},
            },
            "spec": {
                "backoffLimit": 3,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "trainer",
                                "image": "relora-trainer",
                                "command": memo["command"],
                                "env": [
                                    {
                                        "name": "RELORA_TERMINATION_LOG",
                                        "value": "/dev/termination-log",
                                    }
                                ],
                            }
                        ],
                    }
                },
            },
        }
        kopf.adopt(job)
        memo["batch"].create_namespaced_job(namespace, job)
