"""The sandbox's Indexed Jobs: one local process per index, each with its completion index (env
JOB_COMPLETION_INDEX, the annotation, the hostname), a headless Service accepted, and worker 0's
address in that Service's subdomain rewritten to 127.0.0.1 (the sandbox has no DNS) with a port
of the group's own."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import python_job, wait_for

INDEX = "batch.kubernetes.io/job-completion-index"

# Each worker prints what it sees; worker 0 listens on MASTER_ADDR:MASTER_PORT until worker 1
# has connected (a rendezvous over the rewritten address).
CODE = """
import json, os, socket, time
seen = {k: os.environ.get(k) for k in
        ("JOB_COMPLETION_INDEX", "RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTNAME", "ARGS")}
address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
if seen["RANK"] == "0":
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(address); server.listen(1); server.settimeout(30)
        connection, _ = server.accept()
        seen["met"] = connection.recv(8).decode()
else:
    for _ in range(150):
        try:
            socket.create_connection(address, timeout=2).sendall(seen["RANK"].encode())
            break
        except OSError:
            time.sleep(0.2)
print(json.dumps(seen), flush=True)
"""


def _complete(batch: Any, namespace: str, name: str) -> Any:
    def check() -> Any:
        job = batch.read_namespaced_job(name, namespace)
        kinds = {c.type for c in job.status.conditions or [] if c.status == "True"}
        assert "Failed" not in kinds, job.status
        return job if "Complete" in kinds else None

    return wait_for(check, timeout=60, what=f"Job {name} Complete")


def test_an_indexed_job_runs_its_pods_with_distinct_indexes(
    batch: Any, core: Any, namespace: str
) -> None:
    service = {
        "metadata": {"name": "group"},
        "spec": {"clusterIP": "None", "selector": {"group": "g"}, "publishNotReadyAddresses": True},
    }
    core.create_namespaced_service(namespace, service)
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX}']"}}
    env = [
        {"name": "RANK", "valueFrom": index},
        {"name": "MASTER_ADDR", "value": "workers-0.group"},
        {"name": "MASTER_PORT", "value": "29500"},
        {"name": "ARGS", "value": "unused"},
    ]
    job = python_job(
        "workers",
        CODE,
        container={"env": env, "args": ["--node-rank=$(RANK)"]},
        pod={"subdomain": "group"},
        completionMode="Indexed",
        completions=2,
        parallelism=2,
        backoffLimit=0,
    )
    job["spec"]["template"]["metadata"] = {"labels": {"group": "g"}}
    batch.create_namespaced_job(namespace, job)
    done = _complete(batch, namespace, "workers")
    assert done.status.succeeded == 2 and done.status.completed_indexes == "0,1"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=workers").items
    assert len(pods) == 2
    seen = {}
    for pod in pods:
        log = core.read_namespaced_pod_log(pod.metadata.name, namespace)
        found = json.loads(log.strip().splitlines()[-1])
        assert found["JOB_COMPLETION_INDEX"] == found["RANK"] == pod.metadata.annotations[INDEX]
        assert pod.metadata.labels[INDEX] == found["RANK"]
        assert pod.spec.hostname == f"workers-{found['RANK']}"
        assert pod.metadata.name.startswith(f"workers-{found['RANK']}-")
        assert found["MASTER_ADDR"] == "127.0.0.1", "no DNS: worker 0 is this machine"
        assert found["MASTER_PORT"] != "29500", "a port of the group's own"
        seen[found["RANK"]] = found
    assert sorted(seen) == ["0", "1"]
    assert seen["0"]["MASTER_PORT"] == seen["1"]["MASTER_PORT"]
    assert seen["0"]["met"] == "1", "worker 1 reached worker 0 at the rewritten address"


def test_an_indexed_job_fails_as_a_whole_when_a_worker_fails(
    batch: Any, core: Any, namespace: str
) -> None:
    """backoffLimit 0: the first failed worker fails the Job, and the other one is stopped."""
    code = (
        "import os, sys, time\n"
        "if os.environ['JOB_COMPLETION_INDEX'] == '1': sys.exit(7)\n"
        "time.sleep(120)\n"
    )
    job = python_job(
        "broken", code, completionMode="Indexed", completions=2, parallelism=2, backoffLimit=0
    )
    batch.create_namespaced_job(namespace, job)

    def failed() -> Any:
        found = batch.read_namespaced_job("broken", namespace)
        reasons = {c.reason for c in found.status.conditions or [] if c.type == "Failed"}
        return found if "BackoffLimitExceeded" in reasons else None

    wait_for(failed, timeout=60, what="the Job failed")

    def stopped() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=broken").items
        return all(p.status.phase not in ("Pending", "Running") for p in pods)

    wait_for(stopped, timeout=30, what="worker 0 stopped")
