"""s3:// end to end: `relora run` reads the models, the adapter and the data from an
S3-compatible server (moto, started by the test on 127.0.0.1) and writes its result there, with
credentials only from the environment; a second migration finds the output owned at the prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relora_sandbox import processes
from relora_trainer.errors import EXIT_BAD_INPUT, EXIT_NOT_READY, EXIT_OK
from tests.conftest import toy_manifest

BUCKET = "relora-e2e"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free port; the environment a client needs to reach it."""
    port = processes.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "relora-test-key",
        "AWS_SECRET_ACCESS_KEY": "relora-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    yield env
    processes.stop(server)


def _filesystem(env: dict[str, str]) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )


def _on_s3(bucket: str) -> Any:
    """The toy world's URIs once it is copied to ``s3://bucket/toy/`` (what toy_manifest reads)."""

    class OnS3:
        v1 = f"s3://{bucket}/toy/models/v1"
        v2 = f"s3://{bucket}/toy/models/v2-mild"
        adapter = f"s3://{bucket}/toy/adapters/toy-category"

        @staticmethod
        def split(name: str) -> str:
            return f"s3://{bucket}/toy/data/toy-category/{name}.jsonl"

    return OnS3


def _run(
    manifest: dict[str, Any], folder: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    command = [sys.executable, "-m", "relora_cli", "run", "-f", str(path), "--quiet"]
    # A home of its own: the local cache of s3:// files starts empty, as in a new pod.
    return subprocess.run(
        command,
        env={**os.environ, **env, "HOME": str(folder / "home")},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_migration_from_and_to_s3(s3: dict[str, str], toy: Any, tmp_path: Path) -> None:
    fs = _filesystem(s3)
    fs.mkdir(BUCKET)
    fs.put(str(toy.root) + "/", f"{BUCKET}/toy/", recursive=True)
    assert fs.exists(f"{BUCKET}/toy/models/v1/model.safetensors")

    manifest = toy_manifest(_on_s3(BUCKET), strategy="warm-start")
    manifest["spec"]["method"]["finetune"]["maxSteps"] = 10
    manifest["spec"]["output"] = {"uri": f"s3://{BUCKET}/out"}
    first = _run(manifest, tmp_path, s3)
    assert first.returncode in (EXIT_OK, EXIT_NOT_READY), first.stderr
    out = f"{BUCKET}/out/toy-category"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(out)}
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json"} <= names
    assert ".relora-owner.json" in names
    report = json.loads(fs.cat_file(f"{out}/report.json"))
    assert report["output_uri"] == f"s3://{out}" and report["steps"] == 10
    owner = json.loads(fs.cat_file(f"{out}/.relora-owner.json"))
    assert (owner["namespace"], owner["name"]) == ("default", "toy")

    # Another migration, another machine (an empty cache): the prefix is owned, nothing moves.
    before = {p: fs.info(p)["ETag"] for p in fs.find(out)}
    other = {**manifest, "metadata": {"name": "intruder"}}
    second = _run(other, tmp_path / "second", s3)
    assert second.returncode == EXIT_BAD_INPUT, second.stderr
    assert f"OutputInUse: spec.output.uri: s3://{out} belongs to migration default/toy" in (
        second.stderr
    )
    assert {p: fs.info(p)["ETag"] for p in fs.find(out)} == before

    # No credentials: a clear error naming the input, no traceback.
    bare = {k: v for k, v in s3.items() if not k.startswith("AWS_SECRET")}
    denied = _run({**manifest, "metadata": {"name": "denied"}}, tmp_path / "denied", bare)
    assert denied.returncode == EXIT_BAD_INPUT, denied.stderr
    refusal = "error: StorageAccessDenied: spec.adapters[toy-category].data.train: no usable"
    assert f"{refusal} credentials for s3://{BUCKET}/toy/data/" in denied.stderr
    assert "Traceback" not in denied.stderr


def _job(manifest: dict[str, Any], folder: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """The trainer Job's entrypoint as a pod runs it: the spec in the environment, progress as
    JSON lines on stdout, a home (and so a local cache) of its own: a new machine."""
    from relora_api import contract

    folder.mkdir(parents=True, exist_ok=True)
    owner = {"namespace": "team", "name": manifest["metadata"]["name"], "uid": "u-1"}
    return subprocess.Popen(
        [sys.executable, "-m", "relora_trainer.job"],
        env={
            **os.environ,
            **env,
            "HOME": str(folder / "home"),
            contract.ENV_MIGRATION: json.dumps(manifest["spec"]),
            contract.ENV_ADAPTER: manifest["spec"]["adapters"][0]["name"],
            contract.ENV_OWNER: json.dumps(owner),
            contract.ENV_TERMINATION_LOG: str(folder / "termination-log"),
        },
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _progress(line: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(line)
    except ValueError:
        return None
    return record if record.get("event") == "progress" else None


def test_a_pod_killed_mid_run_resumes_from_its_checkpoint_on_s3(
    s3: dict[str, str], toy: Any, tmp_path: Path
) -> None:
    """The output on S3 and nothing kept on the machine: the search journal and the
    fine-tuning checkpoints are uploaded as they are written, and a new pod (an empty cache)
    takes the run over from there: no trial and no step done twice."""
    fs = _filesystem(s3)
    bucket = f"{BUCKET}-resume"
    fs.mkdir(bucket)
    fs.put(str(toy.root) + "/", f"{bucket}/toy/", recursive=True)

    manifest = toy_manifest(_on_s3(bucket), strategy="relora")
    method = manifest["spec"]["method"]
    method["initialization"] = {"trials": 4, "validationSamples": 32}
    method["finetune"] = {
        "maxSteps": 40,
        "evalEvery": 5,
        "checkpointEvery": 5,
        "stopWhenReady": False,
        "batchSize": 8,
    }
    manifest["spec"]["output"] = {"uri": f"s3://{bucket}/out"}
    out = f"{bucket}/out/toy-category"

    first = _job(manifest, tmp_path / "pod-1", s3)
    assert first.stdout is not None
    seen: list[dict[str, Any]] = []
    for line in first.stdout:
        record = _progress(line)
        if record is not None:
            seen.append(record)
            if record.get("stage") == "finetune" and record.get("step", 0) >= 12:
                first.kill()  # SIGKILL: nothing is flushed or uploaded on the way out
                break
    first.wait(timeout=60)
    killed_at = max(r.get("step", 0) for r in seen if r.get("stage") == "finetune")
    assert first.returncode != 0 and 12 <= killed_at < 40, (first.returncode, killed_at)
    assert fs.exists(f"{out}/state/checkpoint.pt") and fs.exists(f"{out}/state/search.journal")
    assert not fs.exists(f"{out}/report.json")
    assert all(r.get("plannedPeakGiB", 0) > 0 for r in seen), "the plan rides on every record"

    second = _job(manifest, tmp_path / "pod-2", s3)
    stdout, _ = second.communicate(timeout=600)
    assert second.returncode in (EXIT_OK, EXIT_NOT_READY), stdout[-2000:]
    records = [r for r in map(_progress, stdout.splitlines()) if r is not None]
    steps = [r["step"] for r in records if r.get("stage") == "finetune"]
    trials = [r["trial"] for r in records if r.get("stage") == "search"]
    assert not trials, "the search had finished: its journal came back, no trial ran again"
    # From the last checkpoint the first pod uploaded (every 5 steps; it may have run a few
    # steps past the last one we read before the kill landed).
    resumed_after = min(steps) - 1
    assert resumed_after % 5 == 0 and 10 <= resumed_after <= killed_at + 5, steps
    assert steps == list(range(resumed_after + 1, 41)), steps
    report = json.loads(fs.cat_file(f"{out}/report.json"))
    assert report["steps"] == 40 and len(report["trials"]) == 4
    assert [e["step"] for e in report["history"]] == list(range(0, 41, 5))
    termination = json.loads((tmp_path / "pod-2" / "termination-log").read_text())
    assert termination["result"]["steps"] == 40

    # A third pod, after the end: the finished result is read from S3, no model is loaded.
    third = _job(manifest, tmp_path / "pod-3", s3)
    stdout, _ = third.communicate(timeout=120)
    assert third.returncode in (EXIT_OK, EXIT_NOT_READY)
    assert not [r for r in map(_progress, stdout.splitlines()) if r is not None]
    assert not (tmp_path / "pod-3" / "home" / ".cache" / "relora" / "s3" / bucket / "toy").exists()
