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


def _run(
    manifest: dict[str, Any], folder: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    command = [sys.executable, "-m", "relora_trainer.cli", "run", "-f", str(path), "--quiet"]
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

    class OnS3:
        v1 = f"s3://{BUCKET}/toy/models/v1"
        v2 = f"s3://{BUCKET}/toy/models/v2-mild"
        adapter = f"s3://{BUCKET}/toy/adapters/toy-category"

        @staticmethod
        def split(name: str) -> str:
            return f"s3://{BUCKET}/toy/data/toy-category/{name}.jsonl"

    manifest = toy_manifest(OnS3, strategy="warm-start")
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
