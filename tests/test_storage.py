"""URIs to local paths: relative paths, PVC claims, and clear errors for unreachable storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relora_trainer.errors import MissingInput, UnsupportedStorage
from relora_trainer.storage import Storage


def test_relative_paths_resolve_against_the_base_dir(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    storage = Storage(base_dir=tmp_path)
    assert storage.fetch("models", what="spec.sourceModel") == tmp_path / "models"
    assert storage.local_path("/abs/x") == Path("/abs/x")


def test_pvc_claims_map_to_folders_under_the_pvc_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELORA_PVC_ROOT", str(tmp_path))
    (tmp_path / "adapters/sentiment").mkdir(parents=True)
    storage = Storage()
    assert storage.fetch("pvc://adapters/sentiment", what="x") == tmp_path / "adapters/sentiment"


def test_missing_input_names_the_field_and_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(MissingInput, match=r"^spec.targetModel: nope does not exist \(looked at "):
        Storage(base_dir=tmp_path).fetch("nope", what="spec.targetModel")


def test_s3_without_s3fs_says_what_to_install(tmp_path: Path) -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedStorage, match="pip install s3fs"):
            Storage(base_dir=tmp_path).fetch("s3://bucket/key", what="spec.output")
    else:  # with s3fs installed there is no offline S3 here; the mapping is still checked
        assert Storage(cache_dir=tmp_path).local_path("s3://bucket/k") == tmp_path / "s3/bucket/k"


def test_hub_download_failure_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MissingInput, match=r"^spec.sourceModel: cannot download hf://org/model"):
        Storage(base_dir=tmp_path).fetch("hf://org/model", what="spec.sourceModel")


def _hub_cache(home: Path, repo: str, revisions: dict[str, Path], refs: dict[str, str]) -> None:
    """The Hugging Face hub's cache layout (what a `huggingface-cli download` leaves): one
    snapshot folder per commit, refs naming commits."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    for commit, source in revisions.items():
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in source.iterdir():
            if file.is_file():
                (snapshot / file.name).write_bytes(file.read_bytes())
    (root / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


def test_hub_models_come_from_the_cache_offline_with_revisions_pinned(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf:// through huggingface_hub's real cache with no network: the revision picks the
    snapshot (a branch through its ref, a commit as is), a subfolder is resolved inside it, and
    what the cache lacks is one clear line naming the field, the repo and the revision."""
    old, new = "a" * 40, "b" * 40
    home = tmp_path / "hf"
    _hub_cache(home, "org/toy", {old: toy.v1, new: toy.v2}, {"main": new, "v1": old})
    from huggingface_hub import constants

    # What HF_HOME and HF_HUB_OFFLINE=1 set when the process starts (read at import time).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    storage = Storage(base_dir=tmp_path)

    latest = storage.fetch("hf://org/toy", what="spec.targetModel")
    assert (
        latest.name == new
        and (latest / "config.json").read_bytes() == (toy.v2 / "config.json").read_bytes()
    )
    assert storage.fetch("hf://org/toy", what="spec.sourceModel", revision="v1").name == old
    pinned = storage.fetch("hf://org/toy", what="spec.sourceModel", revision=old)
    assert (pinned / "model.safetensors").read_bytes() == (
        toy.v1 / "model.safetensors"
    ).read_bytes()
    inside = storage.fetch("hf://org/toy/config.json", what="spec.targetModel", revision=old)
    assert inside == pinned / "config.json"

    with pytest.raises(
        MissingInput,
        match=r"^spec.sourceModel: cannot download hf://org/toy \(revision "
        r"c{40}\): .*; check the name, HF_TOKEN and network access$",
    ):
        storage.fetch("hf://org/toy", what="spec.sourceModel", revision="c" * 40)
    with pytest.raises(MissingInput, match=r"^spec.targetModel: nothing.json is not in hf://org"):
        storage.fetch("hf://org/toy/nothing.json", what="spec.targetModel")
