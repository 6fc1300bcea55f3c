"""Nothing lost, nothing borrowed: an output never overwrites an input or another migration's
result, one writer at a time, results swapped in whole. Through `relora run` on copies of the
toy world, with every input and foreign output checked byte for byte (hashes)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml

from relora_api import contract
from relora_api.resource import AdapterMigration
from relora_api.validation import validate_manifest
from relora_trainer import errors, job, loading, local_run, ownership, storage
from relora_trainer.errors import EXIT_BAD_INPUT, EXIT_NOT_READY, EXIT_OK
from relora_trainer.storage import Storage
from tests.conftest import toy_manifest

TASK = "toy-category"


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (symbolic links followed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def world(toy: Any, tmp_path: Path) -> Path:
    """A private copy of the toy world (tests may try to damage it)."""
    copy = tmp_path / "world"
    shutil.copytree(toy.root, copy)
    return copy


def _manifest(world: Path, name: str = "toy", **output: Any) -> dict[str, Any]:
    manifest = toy_manifest_for(world)
    manifest["metadata"]["name"] = name
    manifest["spec"]["output"] = {"uri": "output", **output}
    manifest["spec"]["method"] = {"strategy": "warm-start", "finetune": {"maxSteps": 4}}
    return manifest


def toy_manifest_for(world: Path) -> dict[str, Any]:
    class Paths:
        v1 = world / "models" / "v1"
        v2 = world / "models" / "v2-mild"
        adapter = world / "adapters" / TASK

        @staticmethod
        def split(name: str) -> Path:
            return world / "data" / TASK / f"{name}.jsonl"

    return toy_manifest(Paths)


def _run(
    folder: Path, manifest: dict[str, Any], name: str = "migration.yaml", *, quiet: bool = True
) -> int:
    path = folder / name
    path.write_text(yaml.safe_dump(manifest))
    return local_run.run(str(path), quiet=quiet)


# ---------------------------------------------------------------- outputs apart from inputs
def test_an_output_that_is_the_old_adapter_is_refused_by_validation_and_by_the_trainer(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(world)
    manifest = _manifest(world, uri=str(world / "adapters"))
    _, problems = validate_manifest(manifest)
    assert [p.path for p in problems] == ["spec.output"], problems
    assert "would be written to" in str(problems[0]) and "adapters[toy-category].uri" in str(
        problems[0]
    )
    assert _run(tmp_path, manifest) == EXIT_BAD_INPUT
    # The same folder by another spelling (relative to the manifest): only the file system
    # knows, and the trainer refuses it before loading anything.
    (tmp_path / "link").symlink_to(world)
    manifest["spec"]["output"] = {"uri": "link/adapters", "overwrite": True}
    assert validate_manifest(manifest)[0] is not None, "the text alone does not show it"
    capsys.readouterr()
    assert _run(tmp_path, manifest) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "InvalidOutput: spec.output.uri: adapter 'toy-category' would be written to" in err
    assert "spec.adapters[toy-category].uri" in err
    assert digest(world) == before, "no byte of an input changed"


def test_an_output_inside_the_target_model_is_refused(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(world)
    manifest = _manifest(world, uri=str(world / "models" / "v2-mild" / "adapters"))
    migration, problems = validate_manifest(manifest)
    assert migration is None and "lies inside spec.targetModel.uri" in str(problems[0])
    manifest["spec"]["adapters"][0]["name"] = "v2-mild"  # output = the models folder / v2-mild
    manifest["spec"]["output"] = {"uri": str(world / "models")}
    assert "which is spec.targetModel.uri" in str(validate_manifest(manifest)[1][0])
    assert _run(tmp_path, manifest) == EXIT_BAD_INPUT
    assert digest(world) == before


def test_check_apart_compares_resolved_folders(world: Path, tmp_path: Path) -> None:
    spec = AdapterMigration.from_manifest(_manifest(world, uri="out")).spec
    (tmp_path / "out").symlink_to(world / "data")
    where = Storage(base_dir=tmp_path)
    with pytest.raises(errors.InvalidOutput, match=r"holds the folder of spec\.adapters"):
        # out/toy-category -> world/data/toy-category, which holds the train file
        ownership.check_apart(spec, spec.adapters[0], where)
    ownership.check_apart(spec, spec.adapters[0], Storage(base_dir=tmp_path / "elsewhere"))


# ---------------------------------------------------------------- ownership
def test_another_migrations_output_is_neither_overwritten_nor_reused(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = digest(world)
    assert _run(tmp_path, _manifest(world, "first")) in (EXIT_OK, EXIT_NOT_READY)
    out = tmp_path / "output" / TASK
    owner = json.loads((out / ownership.OWNER_FILE).read_text())
    assert (owner["namespace"], owner["name"]) == ("default", "first")
    first = digest(out)
    capsys.readouterr()

    # Same spec, another migration: its result is not served to it, nothing is written.
    assert _run(tmp_path, _manifest(world, "second"), "second.yaml") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"OutputInUse: spec.output.uri: output/{TASK} belongs to migration default/first" in err
    assert "spec.output.overwrite: true" in err and "already migrated" not in err
    assert digest(out) == first
    # Another namespace, same name: another migration too.
    other = _manifest(world, "first")
    other["metadata"]["namespace"] = "team-c"
    assert _run(tmp_path, other, "team-c.yaml") == EXIT_BAD_INPUT
    assert digest(out) == first

    # The first one again: its own result, kept.
    assert _run(tmp_path, _manifest(world, "first"), quiet=False) in (EXIT_OK, EXIT_NOT_READY)
    assert "already migrated" in capsys.readouterr().err
    assert digest(out) == first

    # Said explicitly: replaced, and owned by the second from now on.
    replacing = _manifest(world, "second", overwrite=True)
    assert _run(tmp_path, replacing, "second.yaml", quiet=False) in (EXIT_OK, EXIT_NOT_READY)
    record = ownership.read_record(out)
    assert record is not None and record.owner.name == "second"
    assert "already migrated" not in capsys.readouterr().err
    assert digest(world) == inputs


def test_a_folder_relora_did_not_write_is_left_alone(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "output" / TASK
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("someone's work")
    assert _run(tmp_path, _manifest(world)) == EXIT_BAD_INPUT
    assert "holds files that relora did not write (notes.txt)" in capsys.readouterr().err
    assert digest(out) == {"notes.txt": hashlib.sha256(b"someone's work").hexdigest()}
    assert not (out / ownership.OWNER_FILE).exists()


def _claim(world: Path, tmp_path: Path, name: str, **output: Any) -> ownership.Claim:
    spec = AdapterMigration.from_manifest(_manifest(world, **output)).spec
    return ownership.Claim(
        spec=spec,
        adapter=spec.adapters[0],
        storage=Storage(base_dir=tmp_path),
        owner=ownership.Owner("ns", name, uid=f"uid-{name}"),
        work="f" * 16,
    )


def test_one_writer_at_a_time(world: Path, tmp_path: Path) -> None:
    with _claim(world, tmp_path, "a") as held:
        assert held.lock_path.name == f".{TASK}.relora-lock"
        with pytest.raises(errors.OutputInUse, match="being written by migration ns/a"):
            _claim(world, tmp_path, "b", overwrite=True).__enter__()
        # The same migration (an older pod still ending): not bad input, retried later.
        with pytest.raises(errors.OutputBusy):
            _claim(world, tmp_path, "a").__enter__()
    with _claim(world, tmp_path, "a"):  # released at exit
        pass


def test_a_recreated_migration_of_the_same_name_owns_its_output(
    world: Path, tmp_path: Path
) -> None:
    with _claim(world, tmp_path, "a"):
        pass
    spec = AdapterMigration.from_manifest(_manifest(world)).spec
    claim = ownership.Claim(
        spec=spec,
        adapter=spec.adapters[0],
        storage=Storage(base_dir=tmp_path),
        owner=ownership.Owner("ns", "a", uid="a-new-uid"),
        work="e" * 16,
    )
    with claim:
        record = ownership.read_record(claim.folder)
        assert record is not None and record.owner.uid == "a-new-uid"


# ---------------------------------------------------------------- atomic results
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_results_are_swapped_in_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    real, used = ownership._exchange, []

    def spy(one: Path, other: Path) -> bool:
        used.append(exchange and real(one, other))
        return used[-1]

    monkeypatch.setattr(ownership, "_exchange", spy)
    folder, new = tmp_path / "out", tmp_path / ".out.relora-staging"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_text("old weights")
    (folder / "stale.txt").write_text("old")
    new.mkdir()
    (new / "adapter_model.safetensors").write_text("new weights")
    ownership.replace_folder(new, folder)
    assert digest(folder) == {
        "adapter_model.safetensors": hashlib.sha256(b"new weights").hexdigest()
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "nothing left behind"
    assert used == [exchange], "the exchange ran where the file system has it (ext4, tmpfs)"


def test_a_run_publishes_through_staging_and_keeps_its_state(world: Path, tmp_path: Path) -> None:
    assert _run(tmp_path, _manifest(world)) in (EXIT_OK, EXIT_NOT_READY)
    out = tmp_path / "output" / TASK
    names = sorted(p.name for p in out.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json", "state"} <= set(
        names
    )
    assert ownership.OWNER_FILE in names
    leftovers = sorted(p.name for p in (tmp_path / "output").iterdir())
    assert leftovers == [f".{TASK}.relora-lock", TASK], leftovers


def test_the_search_journal_belongs_to_its_work(world: Path, tmp_path: Path) -> None:
    manifest = _manifest(world)
    manifest["spec"]["method"] = {
        "initialization": {"trials": 2, "validationSamples": 8},
        "finetune": {"maxSteps": 0},
    }
    _run(tmp_path, manifest)
    report = json.loads((tmp_path / "output" / TASK / "report.json").read_text())
    journal = (tmp_path / "output" / TASK / "state" / "search.journal").read_text()
    assert f"relora-initialization-{report['fingerprint']}" in journal


# ---------------------------------------------------------------- S3 outputs
def test_s3_outputs_carry_the_record_at_the_prefix(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = fsspec.filesystem("memory")
    monkeypatch.setattr(storage, "s3_filesystem", lambda what: memory)
    uri = "s3://bucket/adapters"
    where = Storage(base_dir=tmp_path, cache_dir=tmp_path / "cache")
    spec = AdapterMigration.from_manifest(_manifest(world, uri=uri)).spec
    adapter = spec.adapters[0]

    def claim(name: str) -> ownership.Claim:
        owner = ownership.Owner("ns", name)
        return ownership.Claim(spec=spec, adapter=adapter, storage=where, owner=owner, work="w")

    with claim("a"):
        pass
    remote = f"{uri}/{TASK}/{ownership.OWNER_FILE}"
    assert json.loads(memory.cat_file(remote))["name"] == "a"
    shutil.rmtree(tmp_path / "cache")  # another pod: an empty local cache
    with pytest.raises(errors.OutputInUse, match="belongs to migration ns/a"):
        ownership.check_owner(spec, adapter, where, ownership.Owner("ns", "b"))
    with pytest.raises(errors.OutputInUse, match="belongs to migration ns/a"):
        claim("b").__enter__()
    ownership.check_owner(spec, adapter, where, ownership.Owner("ns", "a"))


# ---------------------------------------------------------------- bounded work, claims
def _write_task(folder: Path, completions: int) -> dict[str, str]:
    folder.mkdir(parents=True)
    paths = {}
    for split in ("train", "validation"):
        lines = [
            json.dumps({"prompt": f"item {i} is", "completion": f" word{i}"})
            for i in range(completions)
        ]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        paths[split] = str(folder / f"{split}.jsonl")
    return paths


def test_accuracy_over_free_form_completions_is_refused_before_loading(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(world)
    manifest["spec"]["adapters"][0]["data"] = _write_task(tmp_path / "task", 300)
    manifest["spec"]["sourceModel"]["uri"] = str(tmp_path / "absent-model")
    assert _run(tmp_path, manifest) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    # The data error, not the missing model: nothing was loaded.
    assert "InvalidData: spec.adapters[toy-category].data: 300 distinct completions" in err
    assert "readiness.metric: loss" in err


def test_the_loss_metric_takes_free_form_completions(world: Path, tmp_path: Path) -> None:
    manifest = _manifest(world)
    manifest["spec"]["adapters"][0]["data"] = _write_task(tmp_path / "task", 300)
    manifest["spec"]["adapters"][0]["readiness"] = {"metric": "loss", "relativeToSource": 0.5}
    assert _run(tmp_path, manifest) in (EXIT_OK, EXIT_NOT_READY)
    report = json.loads((tmp_path / "output" / TASK / "report.json").read_text())
    assert report["quality"]["after"]["validation"]["accuracy"] is None
    assert report["quality"]["after"]["validation"]["loss"] > 0


def test_a_pvc_path_leading_out_of_its_claim_is_refused(tmp_path: Path) -> None:
    claim = tmp_path / "pvc" / "models"
    claim.mkdir(parents=True)
    (claim / "inside").mkdir()
    (claim / "escape").symlink_to(tmp_path / "secret")
    (claim / "loop").symlink_to(claim / "inside")
    where = Storage(pvc_root=tmp_path / "pvc")
    assert where.local_path("pvc://models/inside/v1") == claim / "inside" / "v1"
    assert where.local_path("pvc://models/loop") == claim / "loop"  # a link within: fine
    with pytest.raises(
        errors.OutsideClaim, match=re.escape("spec.targetModel: pvc://models/escape/v2")
    ):
        where.fetch("pvc://models/escape/v2", what="spec.targetModel")
    with pytest.raises(errors.OutsideClaim):
        where.check_writable("pvc://models/escape/out", what="spec.output")
    assert not (tmp_path / "secret").exists(), "nothing written outside the claim"


def test_a_finished_result_is_reported_without_loading_any_model(
    world: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A retried pod, or the operator re-reading an outcome whose status was forged, gets the
    owned result from the output in seconds, without loading a base (minutes on a real LLM)."""
    manifest = _manifest(world)
    code = _run(tmp_path, manifest)
    report = json.loads((tmp_path / "output" / TASK / "report.json").read_text())

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_bases", never)
    capsys.readouterr()
    assert _run(tmp_path, manifest) == code
    assert "already migrated" in capsys.readouterr().err

    spec = AdapterMigration.from_manifest(manifest).spec
    termination = tmp_path / "termination-log"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(contract.ENV_MIGRATION, contract.single_adapter_spec(spec, TASK))
    monkeypatch.setenv(contract.ENV_ADAPTER, TASK)
    monkeypatch.setenv(contract.ENV_OWNER, contract.owner("default", "toy", "uid-1"))
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(termination))
    assert job.run() == EXIT_OK
    outcome = contract.Outcome.decode(termination.read_text())
    assert outcome is not None and outcome.result is not None
    assert outcome.result.steps == report["steps"] and outcome.result.ready == report["ready"]
    # Another migration's pod gets nothing of it, and loads nothing either.
    monkeypatch.setenv(contract.ENV_OWNER, contract.owner("default", "other", "uid-2"))
    assert job.run() == EXIT_BAD_INPUT
    outcome = contract.Outcome.decode(termination.read_text())
    assert outcome is not None and outcome.reason == "OutputInUse"


def test_a_result_from_before_ownership_records_says_so(world: Path, tmp_path: Path) -> None:
    spec = AdapterMigration.from_manifest(_manifest(world)).spec
    out = tmp_path / "output" / TASK
    out.mkdir(parents=True)
    (out / "report.json").write_text("{}")
    owner = ownership.Owner("default", "toy")
    with pytest.raises(errors.OutputInUse, match="without an ownership record"):
        ownership.check_owner(spec, spec.adapters[0], Storage(base_dir=tmp_path), owner)
