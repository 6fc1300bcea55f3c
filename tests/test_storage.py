"""URIs to local paths: relative paths, PVC claims, and clear errors for unreachable storage."""

from __future__ import annotations

from pathlib import Path

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
