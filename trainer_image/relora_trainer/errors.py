"""Errors a user can cause, and the exit codes every `relora` command and the trainer Job use.

A :class:`BadInput` is deterministic: retrying cannot fix it, so the trainer Job exits with
``EXIT_BAD_INPUT`` and the Job's podFailurePolicy fails the Job at once instead of retrying.
"""

from __future__ import annotations

import sys

from relora_api import contract, manifests

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = contract.EXIT_BAD_INPUT  # the Job's podFailurePolicy depends on it
EXIT_NOT_READY = 4


class BadInput(Exception):
    """Input that will never work as given: the message names the file or field and the fix."""

    reason = "InvalidInput"


class MissingInput(BadInput):
    """A file or folder the manifest points at does not exist."""

    reason = "MissingInput"


class InvalidData(BadInput):
    """Task data that is empty or malformed."""

    reason = "InvalidData"


class InvalidAdapter(BadInput):
    """An adapter folder that is not a usable PEFT LoRA adapter for these models."""

    reason = "InvalidAdapter"


class IncompatibleModels(BadInput):
    """Source and target models that do not share an architecture and weight shapes."""

    reason = "IncompatibleModels"


class InvalidWeights(BadInput):
    """Weights with NaN or infinite values."""

    reason = "InvalidWeights"


class UnsupportedStorage(BadInput):
    """A URI whose storage is not reachable from here (e.g. s3:// without s3fs installed)."""

    reason = "UnsupportedStorage"


class StorageAccessDenied(BadInput):
    """Object storage refused the trainer: no credentials, partial ones, or no permission."""

    reason = "StorageAccessDenied"


class OutputNotWritable(BadInput):
    """The output storage refuses writes (no permission, read-only, full, a file where a folder
    must be): retrying the same pod on the same storage cannot help."""

    reason = "OutputNotWritable"


class InvalidOutput(BadInput):
    """An output folder that is, contains or lies inside an input of the same migration."""

    reason = "InvalidOutput"


class OutputInUse(BadInput):
    """An output folder that belongs to another migration (or holds files relora did not
    write), or that another migration is writing right now."""

    reason = "OutputInUse"


class OutsideClaim(BadInput):
    """A pvc:// path that leads out of its claim's folder (through a symbolic link)."""

    reason = "OutsideClaim"


class OutOfMemory(BadInput):
    """The migration did not fit the memory of its device: the same pod on the same machine
    would run out again, so it is not retried; the message gives the estimate and the fix."""

    reason = "OutOfMemory"


class OutputBusy(RuntimeError):
    """The output folder is locked by another run of the same migration (a pod of an earlier
    attempt still ending): not bad input, a later attempt will get it."""

    reason = "OutputBusy"


class CorpusError(RuntimeError):
    """A testbed corpus could not be obtained; the one-line message says what to do. (Not a
    migration input, so not a BadInput: it has no status reason.)"""


def refuse(error: BaseException) -> int:
    """Print a command's one-line refusal on stderr; return its exit code: usage for a manifest
    that cannot be read, bad input for what the user must change (an input, a corpus), internal
    for anything else."""
    if isinstance(error, manifests.ManifestError | CorpusError):
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, manifests.ManifestError) else EXIT_BAD_INPUT
    if isinstance(error, BadInput):
        print(f"error: {error.reason}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
    return EXIT_INTERNAL
