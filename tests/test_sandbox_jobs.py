"""The Job runner: pods as subprocesses, Job status like the Job controller's, fault hooks."""

from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Any

from relora_sandbox.faults import Fault
from tests.conftest import python_job, wait_for


def _condition(job: Any, kind: str) -> Any:
    for condition in job.status.conditions or []:
        if condition.type == kind and condition.status == "True":
            return condition
    return None


def _finished(batch: Any, namespace: str, name: str, kind: str) -> Any:
    def check() -> Any:
        job = batch.read_namespaced_job(name, namespace)
        return job if _condition(job, kind) else None

    return wait_for(check)


def _pods(core: Any, namespace: str, job: str) -> list[Any]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    return sorted(pods, key=lambda p: p.metadata.creation_timestamp)


def test_a_python_one_liner_runs_to_complete(batch: Any, core: Any, namespace: str) -> None:
    code = (
        "import os; print('hello', os.environ['WHO'], os.environ['POD']); "
        "open('/dev/termination-log', 'w').write('all done')"
    )
    env = [
        {"name": "WHO", "value": "sandbox"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    batch.create_namespaced_job(namespace, python_job("hello", code, container={"env": env}))
    job = _finished(batch, namespace, "hello", "Complete")
    assert job.status.succeeded == 1 and job.status.completion_time is not None
    (pod,) = _pods(core, namespace, "hello")
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0 and terminated.message == "all done"
    log = core.read_namespaced_pod_log(pod.metadata.name, namespace)
    assert log.strip() == f"hello sandbox {pod.metadata.name}"


def test_pod_logs_honour_tail_since_and_limit(batch: Any, core: Any, namespace: str) -> None:
    """What the operator's incremental progress reads ask: the last lines, nothing if the log
    was not written in ``sinceSeconds``, at most ``limitBytes``."""
    code = "import time; print('one'); print('two'); print('three', flush=True); time.sleep(60)"
    batch.create_namespaced_job(namespace, python_job("talk", code))
    pod = wait_for(lambda: next(iter(_pods(core, namespace, "talk")), None), what="the pod")
    name = pod.metadata.name

    def log(**query: Any) -> str:
        return str(core.read_namespaced_pod_log(name, namespace, **query))

    wait_for(lambda: "three" in log(), what="the log written")
    assert log(tail_lines=2) == "two\nthree\n"
    assert log(tail_lines=2, limit_bytes=5) == "two\nt"
    assert log(since_seconds=30) == "one\ntwo\nthree\n"
    time.sleep(2.2)
    assert log(since_seconds=1) == "", "nothing written in the last second"
    batch.delete_namespaced_job("talk", namespace, propagation_policy="Background")


def test_a_failing_job_retries_per_backoff_limit(batch: Any, core: Any, namespace: str) -> None:
    batch.create_namespaced_job(
        namespace, python_job("fail", "raise SystemExit(3)", backoffLimit=2)
    )
    job = _finished(batch, namespace, "fail", "Failed")
    assert _condition(job, "Failed").reason == "BackoffLimitExceeded"
    assert job.status.failed == 3
    pods = _pods(core, namespace, "fail")
    assert len(pods) == 3
    assert {p.status.container_statuses[0].state.terminated.exit_code for p in pods} == {3}


def test_pod_failure_policy_fails_the_job_on_a_dedicated_exit_code(
    batch: Any, core: Any, namespace: str
) -> None:
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    job = python_job("bad-input", "raise SystemExit(42)", backoffLimit=5, podFailurePolicy=policy)
    batch.create_namespaced_job(namespace, job)
    failed = _finished(batch, namespace, "bad-input", "Failed")
    condition = _condition(failed, "Failed")
    assert condition.reason == "PodFailurePolicy"
    assert "exit code 42" in condition.message and "FailJob rule at index 0" in condition.message
    assert len(_pods(core, namespace, "bad-input")) == 1, "no retry"


def test_a_disruption_is_ignored_and_the_job_retries(
    sandbox: Any, batch: Any, core: Any, namespace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "first-run"
    code = (
        f"import pathlib, time; p = pathlib.Path({str(marker)!r})\n"
        "if not p.exists():\n    p.write_text('x'); time.sleep(60)"
    )
    policy = {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
        ]
    }
    batch.create_namespaced_job(
        namespace, python_job("preempted", code, backoffLimit=0, podFailurePolicy=policy)
    )
    first = wait_for(
        lambda: [p for p in _pods(core, namespace, "preempted") if p.status.phase == "Running"]
    )[0]
    wait_for(marker.exists)
    assert sandbox.thread.call(sandbox.jobs.kill, namespace, first.metadata.name)
    job = _finished(batch, namespace, "preempted", "Complete")
    assert job.status.failed == 0, "a disruption does not count toward backoffLimit"
    pods = _pods(core, namespace, "preempted")
    assert len(pods) == 2
    (disrupted,) = [
        c for p in pods for c in p.status.conditions or [] if c.type == "DisruptionTarget"
    ]
    assert disrupted.status == "True" and disrupted.reason == "PreemptionByScheduler"


def test_active_deadline_kills_the_pod(batch: Any, core: Any, namespace: str) -> None:
    batch.create_namespaced_job(
        namespace, python_job("slow", "import time; time.sleep(60)", activeDeadlineSeconds=1)
    )
    job = _finished(batch, namespace, "slow", "Failed")
    assert _condition(job, "Failed").reason == "DeadlineExceeded"
    wait_for(lambda: not [p for p in _pods(core, namespace, "slow") if p.status.phase == "Running"])


def test_suspend_and_resume(batch: Any, core: Any, namespace: str) -> None:
    batch.create_namespaced_job(namespace, python_job("later", "print('ran')", suspend=True))
    wait_for(lambda: _condition(batch.read_namespaced_job("later", namespace), "Suspended"))
    time.sleep(0.5)
    assert _pods(core, namespace, "later") == []
    batch.patch_namespaced_job("later", namespace, {"spec": {"suspend": False}})
    _finished(batch, namespace, "later", "Complete")


def test_unschedulable_and_image_pull_faults(
    sandbox: Any, batch: Any, core: Any, namespace: str
) -> None:
    sandbox.thread.call(sandbox.jobs.add_fault, Fault("Unschedulable", "fault=unschedulable"))
    sandbox.thread.call(sandbox.jobs.add_fault, Fault("ImagePullBackOff", image="no-such:image"))
    try:
        labels = {"metadata": {"labels": {"fault": "unschedulable"}}}
        stuck = python_job("stuck", "print(1)")
        stuck["spec"]["template"].update(labels)
        batch.create_namespaced_job(namespace, stuck)
        batch.create_namespaced_job(
            namespace, python_job("pull", "print(1)", container={"image": "no-such:image"})
        )

        def scheduled_false() -> Any:
            pods = _pods(core, namespace, "stuck")
            conditions = pods[0].status.conditions if pods else None
            return conditions and conditions[0].reason == "Unschedulable"

        wait_for(scheduled_false)

        def pull_failed() -> Any:
            pods = _pods(core, namespace, "pull")
            statuses = pods[0].status.container_statuses if pods else None
            return statuses and statuses[0].state.waiting.reason == "ImagePullBackOff"

        wait_for(pull_failed)
        assert _pods(core, namespace, "stuck")[0].status.phase == "Pending"
    finally:
        sandbox.thread.call(sandbox.jobs.clear_faults)
    _finished(batch, namespace, "stuck", "Complete")


def test_env_from_secrets_and_a_pvc_volume(
    sandbox: Any, batch: Any, core: Any, namespace: str
) -> None:
    token = base64.b64encode(b"s3cr3t").decode()
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "data": {"token": token}}
    )
    code = "import os; open('/mnt/out/token.txt', 'w').write(os.environ['TOKEN'])"
    container = {
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}
        ],
        "volumeMounts": [{"name": "out", "mountPath": "/mnt/out"}],
    }
    pod = {"volumes": [{"name": "out", "persistentVolumeClaim": {"claimName": "results"}}]}
    batch.create_namespaced_job(namespace, python_job("secret", code, container=container, pod=pod))
    _finished(batch, namespace, "secret", "Complete")
    assert (Path(sandbox.jobs.pvc_root) / "results" / "token.txt").read_text() == "s3cr3t"


def test_a_missing_secret_blocks_the_pod_with_a_reason(
    batch: Any, core: Any, namespace: str
) -> None:
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    batch.create_namespaced_job(
        namespace, python_job("noconfig", "print(1)", container={"env": env})
    )

    def blocked() -> Any:
        pods = _pods(core, namespace, "noconfig")
        statuses = pods[0].status.container_statuses if pods else None
        return statuses and statuses[0].state.waiting.reason == "CreateContainerConfigError"

    wait_for(blocked)


def test_ttl_after_finished_deletes_the_job_and_its_pods(
    batch: Any, core: Any, namespace: str
) -> None:
    batch.create_namespaced_job(
        namespace, python_job("short", "print(1)", ttlSecondsAfterFinished=0)
    )
    wait_for(lambda: not batch.list_namespaced_job(namespace).items)
    wait_for(lambda: not _pods(core, namespace, "short"))


def test_deleting_a_job_kills_its_running_process(
    batch: Any, core: Any, namespace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "alive"
    code = (
        f"import pathlib, time\nfor i in range(600):\n"
        f"    pathlib.Path({str(marker)!r}).write_text(str(i)); time.sleep(0.05)"
    )
    batch.create_namespaced_job(namespace, python_job("victim", code))
    wait_for(marker.exists)
    batch.delete_namespaced_job("victim", namespace, propagation_policy="Background")
    wait_for(lambda: not _pods(core, namespace, "victim"))
    time.sleep(0.3)
    seen = marker.read_text()
    time.sleep(0.3)
    assert marker.read_text() == seen, "the pod's process must be gone"


def test_a_scratch_volume_over_tmp_keeps_host_paths_working(
    batch: Any, namespace: str, tmp_path: Path
) -> None:
    script = tmp_path / "hello.py"  # under /tmp, where the Job mounts an emptyDir
    script.write_text("print('ok')\n")
    job = python_job(
        "scratch",
        "",
        container={
            "command": [sys.executable, str(script)],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        },
        pod={"volumes": [{"name": "tmp", "emptyDir": {}}]},
    )
    batch.create_namespaced_job(namespace, job)
    _finished(batch, namespace, "scratch", "Complete")
