"""Turn manifest URIs into local paths the trainer reads and writes.

- plain paths: relative ones resolve against ``base_dir`` (the manifest's folder locally, the
  working directory in a pod);
- ``pvc://CLAIM/PATH``: ``<mount of CLAIM>/PATH`` for the claims the trainer Job mounts (the
  operator says where, see relora_api.contract), else ``<pvc_root>/CLAIM/PATH``;
- ``hf://ORG/NAME``: downloaded with huggingface_hub into its cache (honours HF_TOKEN, HF_HOME);
- ``s3://BUCKET/KEY``: through fsspec/s3fs when installed (inputs are copied into a cache folder,
  outputs are written locally and uploaded by :func:`publish`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from relora_api import contract, uris
from relora_trainer.errors import (
    MissingInput,
    OutputNotWritable,
    OutsideClaim,
    StorageAccessDenied,
    UnsupportedStorage,
)

PVC_ROOT_ENV = "RELORA_PVC_ROOT"
DEFAULT_PVC_ROOT = contract.PVC_MOUNT_ROOT
WRITE_CHECK = ".relora-write-check"
"""The file :meth:`Storage.check_writable` writes (and removes) in an output folder."""

# Write failures that a retry on the same storage cannot fix.
UNWRITABLE = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.ENOTDIR: "a file is where a folder must be",
    errno.EEXIST: "a file is where a folder must be",
    errno.EISDIR: "a folder is where a file must be",
}


@dataclass(frozen=True)
class Storage:
    """Where relative paths and PVC claims live on this machine."""

    base_dir: Path = field(default_factory=Path.cwd)
    pvc_root: Path = field(
        default_factory=lambda: Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
    )
    pvc_mounts: dict[str, Path] = field(default_factory=dict)  # claim -> where it is mounted
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "relora")

    @classmethod
    def for_manifest(cls, path: str) -> Storage:
        """Relative paths of the manifest at ``path`` resolve against its folder (stdin: here)."""
        return cls(base_dir=Path.cwd() if path == "-" else Path(path).resolve().parent)

    def local_path(self, uri: str, *, what: str = "uri") -> Path:
        """The local path for ``uri`` without fetching anything (paths and PVCs only); raise
        OutsideClaim naming ``what`` when a pvc:// path leads out of its claim (a symbolic
        link inside the volume pointing elsewhere)."""
        parsed = uris.parse_uri(uri)
        if parsed.scheme == "path":
            path = Path(parsed.path)
            return path if path.is_absolute() else self.base_dir / path
        if parsed.scheme == "pvc":
            root = self.pvc_mounts.get(parsed.authority, self.pvc_root / parsed.authority)
            path = root / parsed.path
            real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
            if real != real_root and real_root not in real.parents:
                raise OutsideClaim(
                    f"{what}: {uri} leads out of claim {parsed.authority!r} (a symbolic link in "
                    f"the volume resolves it to {real}); point it at a path inside the claim"
                )
            return path
        if parsed.scheme == "s3":
            return self.cache_dir / "s3" / parsed.authority / parsed.path
        return self.cache_dir / "hf" / parsed.authority / parsed.path

    def fetch(self, uri: str, *, what: str, revision: str | None = None) -> Path:
        """A local path holding ``uri``'s content; raise MissingInput naming ``what``."""
        parsed = uris.parse_uri(uri)
        if parsed.scheme == "hf":
            return self._fetch_hub(parsed, what=what, revision=revision)
        if parsed.scheme == "s3":
            self._copy_s3(f"s3://{parsed.authority}/{parsed.path}", self.local_path(uri), what)
        path = self.local_path(uri, what=what)
        if not path.exists():
            raise MissingInput(f"{what}: {uri} does not exist (looked at {path})")
        return path

    def _fetch_hub(self, parsed: uris.ParsedURI, *, what: str, revision: str | None) -> Path:
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        except ImportError as error:  # pragma: no cover - transformers depends on it
            raise UnsupportedStorage(f"{what}: hf:// needs huggingface_hub installed") from error
        try:
            folder = Path(snapshot_download(repo_id=parsed.authority, revision=revision))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
            raise MissingInput(
                f"{what}: cannot download hf://{parsed.authority} (revision "
                f"{revision or 'main'}): {type(error).__name__}; check the name, HF_TOKEN and "
                "network access"
            ) from error
        path = folder / parsed.path if parsed.path else folder
        if not path.exists():
            raise MissingInput(f"{what}: {parsed.path} is not in hf://{parsed.authority}")
        return path

    def _copy_s3(self, remote: str, local: Path, what: str) -> None:
        filesystem = s3_filesystem(what)
        with s3_access(what, remote):
            if not filesystem.exists(remote):
                raise MissingInput(f"{what}: {remote} does not exist")
            local.parent.mkdir(parents=True, exist_ok=True)
            filesystem.get(remote, str(local), recursive=filesystem.isdir(remote))

    def check_writable(self, uri: str, *, what: str) -> Path:
        """Create the local folder of output ``uri`` and write a file in it, before any long
        work; raise OutputNotWritable naming ``what`` and the reason when that fails."""
        if uris.parse_uri(uri).scheme == "hf":
            raise UnsupportedStorage(f"{what}: hf:// is read-only here; write to a path, pvc or s3")
        folder = self.local_path(uri, what=what)
        probe = folder / WRITE_CHECK
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with probe.open("wb") as handle:
                handle.write(b"relora write check\n")
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
        except OSError as error:
            found = unwritable(error, what=what, uri=uri, folder=folder)
            if found is None:
                raise
            raise found from error
        return folder

    def publish(self, local: Path, uri: str) -> None:
        """Make ``local`` available at ``uri``: a copy for other local paths, an upload to S3."""
        parsed = uris.parse_uri(uri)
        if parsed.scheme == "s3":
            with s3_access("spec.output.uri", uri):
                self.upload(local, uri)
        elif parsed.scheme == "hf":
            raise UnsupportedStorage("output: hf:// is read-only here; write to a path, pvc or s3")
        elif local.resolve() != self.local_path(uri, what="spec.output.uri").resolve():
            shutil.copytree(local, self.local_path(uri), dirs_exist_ok=True)

    @staticmethod
    def upload(local: Path, uri: str) -> None:
        """File by file into the prefix (a folder put onto an existing prefix nests), the
        report last: it marks the result finished for whoever reads the prefix."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == "report.json")
        remote = [f"{uri.rstrip('/')}/{p.relative_to(local).as_posix()}" for p in files]
        s3_filesystem("output").put([str(p) for p in files], remote)


def unwritable(error: OSError, *, what: str, uri: str, folder: Path) -> OutputNotWritable | None:
    """An OutputNotWritable for a write failure in ``folder`` that no retry can fix, else None
    (the error is then another kind, or about another file)."""
    if error.errno not in UNWRITABLE:
        return None
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    inside = not paths or any(_within(Path(os.fsdecode(p)), folder) for p in paths)
    if not inside:
        return None
    where = f" at {paths[0]}" if paths else ""
    return OutputNotWritable(
        f"{what}: cannot write {uri} (local folder {folder}): {UNWRITABLE[error.errno]}{where}"
    )


@contextlib.contextmanager
def s3_access(what: str, uri: str) -> Iterator[None]:
    """Object-store refusals as StorageAccessDenied naming ``what`` (no retry fixes missing
    credentials or permissions: the secret must change)."""
    try:
        yield
    except PermissionError as error:
        raise StorageAccessDenied(
            f"{what}: access to {uri} denied ({error}); check the trainer's credentials "
            "(spec.env / spec.envFrom secrets) and the bucket policy"
        ) from error
    except Exception as error:
        if type(error).__name__ not in ("NoCredentialsError", "PartialCredentialsError"):
            raise
        raise StorageAccessDenied(
            f"{what}: no usable credentials for {uri} ({error}); give the trainer "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY through spec.envFrom (a Secret), or a "
            "spec.serviceAccountName bound to a role"
        ) from error


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder``, inside it, or one of the folders above it (created on the way)."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents or path in folder.parents


def s3_filesystem(what: str):  # type: ignore[no-untyped-def]
    try:
        import fsspec

        return fsspec.filesystem("s3")
    except (ImportError, ValueError) as error:
        raise UnsupportedStorage(
            f"{what}: s3:// needs the s3fs package in the trainer image (pip install s3fs)"
        ) from error
