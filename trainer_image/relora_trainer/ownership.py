"""Who may write an adapter's output folder, one writer at a time, and how results land there.

- **Apart from the inputs.** An output folder is never an input of its migration, never inside
  one and never holds one (a model, an adapter, a data file), compared as the folders the URIs
  resolve to (symbolic links and relative paths included). ``spec.output.overwrite`` does not
  lift this.
- **Owned.** The first migration that writes ``URI/NAME`` leaves an ownership record in it
  (``.relora-owner.json``: namespace, name, uid, the fingerprint of its work). Another migration
  (another namespace or name) never writes there nor reuses what is there: it fails with
  ``OutputInUse`` naming the owner, unless its spec sets ``output.overwrite: true``. A folder
  with files but no record (not written by relora) is treated the same way. The same migration
  deleted and created again (same namespace and name, new uid) is the same owner.
- **One writer.** A run holds an exclusive lock (``flock``) on ``URI/.NAME.relora-lock`` from its
  claim to its end; a second writer is refused at once (another owner) or retried later (the
  same owner: a pod of an older attempt still ending).
- **Atomic results.** The adapter, report.json and summary.md are written to a staging folder
  beside the output and swapped in with one rename (Linux ``renameat2(RENAME_EXCHANGE)``; two
  renames where the file system has no exchange, during which the folder is briefly absent):
  a reader sees the old adapter or the new one, never a mix.

On S3 the record is read and written at the output prefix too (an object store has no lock:
two writers on one prefix at the same instant are not excluded there).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from relora_api import uris
from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_trainer import storage as storage_module
from relora_trainer.errors import InvalidOutput, OutputBusy, OutputInUse
from relora_trainer.storage import Storage

OWNER_FILE = ".relora-owner.json"
LOCK_SUFFIX = ".relora-lock"
STAGING_SUFFIX = ".relora-staging"
IGNORED = {storage_module.WRITE_CHECK}
"""Files whose presence does not make a folder someone else's."""


@dataclass(frozen=True)
class Owner:
    """The migration an output folder belongs to. ``uid`` is empty for `relora run`."""

    namespace: str
    name: str
    uid: str = ""

    def same(self, other: Owner) -> bool:
        """The same migration: same namespace and name (a uid changes when it is recreated)."""
        return (self.namespace, self.name) == (other.namespace, other.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f" (uid {self.uid})" if self.uid else "")


LOCAL = Owner(namespace="local", name="relora")
"""The owner of runs that name none (benchmarks, tests)."""


@dataclass(frozen=True)
class Record:
    """The ownership record: its owner and the fingerprint of the work it holds."""

    owner: Owner
    fingerprint: str

    def encode(self) -> bytes:
        return (json.dumps({**asdict(self.owner), "fingerprint": self.fingerprint}) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> Record | None:
        try:
            raw: Any = json.loads(data)
            owner = Owner(str(raw["namespace"]), str(raw["name"]), str(raw.get("uid", "")))
            return cls(owner, str(raw.get("fingerprint", "")))
        except (ValueError, KeyError, TypeError):
            return None


def fingerprint(spec: AdapterMigrationSpec, adapter: Adapter) -> str:
    """Identifies the work of one adapter: a changed input or method invalidates saved state."""
    relevant = {
        "source": spec.source_model.to_wire(),
        "target": spec.target_model.to_wire(),
        "adapter": adapter.to_wire(),
        "method": spec.method.to_wire(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def check_apart(spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage) -> None:
    """Raise InvalidOutput when the adapter's output folder is, holds or lies inside an input,
    as local folders (the spec's models compare the URIs' text; this catches what only the
    file system knows: a relative and an absolute path, a PVC's mount, a symbolic link)."""
    output = spec.output_uri(adapter.name)
    if uris.parse_uri(output).scheme not in ("path", "pvc"):
        return
    folder = _real(storage.local_path(output, what="spec.output.uri"))
    for field, uri in spec.inputs():
        if uris.parse_uri(uri).scheme not in ("path", "pvc"):
            continue
        path = _real(storage.local_path(uri, what=field))
        if path == folder or folder in path.parents or path in folder.parents:
            relation = "is"
            if path != folder:
                relation = "holds" if folder in path.parents else "lies in"
            raise InvalidOutput(
                f"spec.output.uri: adapter {adapter.name!r} would be written to {folder}, which "
                f"{relation} the folder of {field} ({uri} -> {path}); an output must not be, "
                "contain or lie inside an input: choose another output.uri"
            )


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def read_record(folder: Path) -> Record | None:
    try:
        return Record.decode((folder / OWNER_FILE).read_bytes())
    except (FileNotFoundError, NotADirectoryError):  # no folder, or a file in its place
        return None


def _foreign_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in IGNORED | {OWNER_FILE})


def _refusal(uri: str, record: Record | None, files: list[str]) -> OutputInUse:
    fix = "choose another spec.output.uri, or set spec.output.overwrite: true to replace it"
    if record is not None:
        return OutputInUse(f"spec.output.uri: {uri} belongs to migration {record.owner}; {fix}")
    shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
    if "report.json" in files:  # a result of a relora release before ownership records
        return OutputInUse(
            f"spec.output.uri: {uri} holds a result without an ownership record (written by "
            f"an earlier relora release, or by hand: {shown}); {fix}"
        )
    return OutputInUse(
        f"spec.output.uri: {uri} holds files that relora did not write ({shown}); {fix}"
    )


class _Remote:
    """The ownership record at an s3:// output (checked and written beside the local one)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs = storage_module.s3_filesystem("spec.output.uri")

    def state(self) -> tuple[Record | None, list[str]]:
        with storage_module.s3_access("spec.output.uri", self.uri):
            if not self.fs.exists(self.uri):
                return None, []
            listed = self.fs.ls(self.uri, detail=False)
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]
            record = None
            if OWNER_FILE in names:
                record = Record.decode(self.fs.cat_file(f"{self.uri}/{OWNER_FILE}"))
        return record, sorted(n for n in names if n not in IGNORED | {OWNER_FILE})

    def clear(self) -> None:
        with storage_module.s3_access("spec.output.uri", self.uri):
            if self.fs.exists(self.uri):
                self.fs.rm(self.uri, recursive=True)

    def write(self, record: Record) -> None:
        with storage_module.s3_access("spec.output.uri", self.uri):
            self.fs.pipe_file(f"{self.uri}/{OWNER_FILE}", record.encode())

    def pull(self, folder: Path) -> None:
        """Copy the prefix's files (saved state, a finished result) into ``folder``."""
        with storage_module.s3_access("spec.output.uri", self.uri):
            prefix = self.uri.removeprefix("s3://").rstrip("/")
            for remote in self.fs.find(prefix):
                relative = remote.removeprefix(prefix).lstrip("/")
                local = folder / relative
                if not relative or not _within_folder(local, folder):
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(local))

    def push(self, local: Path, name: str) -> None:
        """Upload the files of ``local`` to ``URI/name`` (the run's saved state)."""
        with storage_module.s3_access("spec.output.uri", self.uri):
            Storage.upload(local, f"{self.uri}/{name}")


def _within_folder(path: Path, folder: Path) -> bool:
    """An object key that stays inside the folder once it is a path (no ``..``)."""
    resolved, root = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return root in resolved.parents


def restore(spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage, owner: Owner) -> None:
    """A new pod's view of an s3:// output it owns: the prefix's files (the saved state of an
    interrupted run, or the finished result) copied into the local folder that the run works
    in, when that folder holds nothing of its own yet. Nothing for other schemes: their
    folder is the output itself."""
    uri = spec.output_uri(adapter.name)
    if uris.parse_uri(uri).scheme != "s3":
        return
    folder = storage.local_path(uri, what="spec.output.uri")
    if read_record(folder) is None:  # else this machine wrote it: nothing to fetch
        remote = _Remote(uri)
        _adopt(folder, remote, remote.state()[0], owner)


def _adopt(folder: Path, remote: _Remote, record: Record | None, owner: Owner) -> None:
    """Copy the prefix into ``folder`` when ``owner`` left it there and the folder holds no
    record of its own yet (a new machine)."""
    if record is not None and record.owner.same(owner) and read_record(folder) is None:
        remote.pull(folder)


def check_owner(
    spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage, owner: Owner
) -> None:
    """Raise OutputInUse now if the output belongs to someone else (a read-only look, before
    loading models; :class:`Claim` checks again under its lock)."""
    if spec.output.overwrite:
        return
    uri = spec.output_uri(adapter.name)
    folder = storage.local_path(uri, what="spec.output.uri")
    remote = _Remote(uri) if uris.parse_uri(uri).scheme == "s3" else None
    record, files = _standing(folder, remote)
    if _taken(record, files, owner):
        raise _refusal(uri, record, files)


def _standing(folder: Path, remote: _Remote | None) -> tuple[Record | None, list[str]]:
    """The output's ownership record (the object store's first) and its other files."""
    record, files = read_record(folder), _foreign_files(folder)
    if remote is not None:
        remote_record, remote_files = remote.state()
        record, files = remote_record or record, sorted(set(files) | set(remote_files))
    return record, files


def _taken(record: Record | None, files: list[str], owner: Owner) -> bool:
    """Whether an output in this state is someone else's (another owner's, or not relora's)."""
    if record is not None:
        return not record.owner.same(owner)
    return bool(files)


class Claim:
    """The right to write one adapter's output folder for one run (a context manager)."""

    def __init__(
        self,
        *,
        spec: AdapterMigrationSpec,
        adapter: Adapter,
        storage: Storage,
        owner: Owner,
        work: str,
    ) -> None:
        self.uri = spec.output_uri(adapter.name)
        self.folder = storage.local_path(self.uri, what="spec.output.uri")
        self.owner, self.work, self.overwrite = owner, work, spec.output.overwrite
        self.remote = _Remote(self.uri) if uris.parse_uri(self.uri).scheme == "s3" else None
        self._lock: IO[bytes] | None = None

    @property
    def lock_path(self) -> Path:
        return self.folder.with_name(f".{self.folder.name}{LOCK_SUFFIX}")

    @property
    def staging(self) -> Path:
        return self.folder.with_name(f".{self.folder.name}{STAGING_SUFFIX}")

    def __enter__(self) -> Claim:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        handle = self.lock_path.open("a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = Record.decode(handle.read())
            handle.close()
            if holder is not None and holder.owner.same(self.owner):
                raise OutputBusy(
                    f"{self.uri} is being written by another run of this migration "
                    f"({self.lock_path}); retrying later"
                ) from None
            who = f"migration {holder.owner}" if holder else "another process"
            raise OutputInUse(
                f"spec.output.uri: {self.uri} is being written by {who} right now; choose "
                "another spec.output.uri"
            ) from None
        self._lock = handle
        try:
            handle.truncate(0)
            handle.write(Record(self.owner, self.work).encode())
            handle.flush()
            self._take()
        except BaseException:
            self.release()
            raise
        return self

    def _take(self) -> None:
        """Under the lock: check the record, clear the folder if allowed, write our record."""
        record, files = _standing(self.folder, self.remote)
        if _taken(record, files, self.owner):
            if not self.overwrite:
                raise _refusal(self.uri, record, files)
            shutil.rmtree(self.folder, ignore_errors=True)
            if self.remote is not None:
                self.remote.clear()
        elif self.remote is not None:  # ours, left by an earlier pod: its state, its result
            _adopt(self.folder, self.remote, record, self.owner)
        self.folder.mkdir(parents=True, exist_ok=True)
        mark = Record(self.owner, self.work)
        write_atomic(self.folder / OWNER_FILE, mark.encode())
        if self.remote is not None:
            self.remote.write(mark)

    def save_state(self, name: str) -> None:
        """Make the run's saved state (the folder ``name`` in the output) outlive this machine:
        uploaded to the s3:// prefix, from where :func:`restore` brings it to a retried pod.
        Nothing to do on a local or pvc output (the folder is the output)."""
        if self.remote is not None and (self.folder / name).is_dir():
            self.remote.push(self.folder / name, name)

    def fresh_staging(self) -> Path:
        """An empty staging folder beside the output (same file system: one rename away)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def publish(self, keep: tuple[str, ...] = ()) -> None:
        """Swap the staging folder in as the output folder, carrying over the ownership record
        and the entries named in ``keep`` (the run's saved state)."""
        for name in (OWNER_FILE, *keep):
            if (self.folder / name).exists():
                os.replace(self.folder / name, self.staging / name)
        replace_folder(self.staging, self.folder)

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a partial file renamed over it)."""
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(one: Path, other: Path) -> bool:
    """Swap two folders in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(one), _AT_FDCWD, os.fsencode(other), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(one), None, str(other))


def replace_folder(new: Path, folder: Path) -> None:
    """Put ``new`` at ``folder``: a reader sees the old folder or the new one, never a mix."""
    if not folder.exists():
        os.rename(new, folder)
        return
    if _exchange(new, folder):
        shutil.rmtree(new)
        return
    old = folder.with_name(f".{folder.name}.relora-old-{os.getpid()}-{socket.gethostname()}")
    os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old)
