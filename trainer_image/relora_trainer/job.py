"""The trainer Job's entrypoint: migrate one adapter as the operator asks (`python -m ...job`).

It runs the same code path as `relora run` (relora_trainer.migrate) and follows the contract in
relora_api.contract: the spec comes in the environment, progress goes to stdout as JSON
lines, the outcome goes to the termination message, and the exit code says whether a retry
can help (0 done, 3 bad input: never retried, anything else: retried, resuming from the
checkpoints in the output storage). An output that cannot be written (no permission, read-only,
full, a file where the folder must be) is bad input too: it is checked before the ML stack is
even imported, and a write failing the same way later ends the pod with exit 3 as well.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from relora_api import contract
from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_trainer import errors, ownership, storage
from relora_trainer.storage import Storage


def _write(outcome: contract.Outcome) -> None:
    path = Path(os.environ.get(contract.ENV_TERMINATION_LOG, contract.TERMINATION_LOG))
    try:
        path.write_text(outcome.encode())
    except OSError as error:
        print(f"cannot write the termination message to {path}: {error}", file=sys.stderr)


def _request() -> tuple[AdapterMigrationSpec, Adapter, Storage, ownership.Owner]:
    """The spec, the adapter, the storage and the owner this pod is asked to work with
    (BadInput if the environment the operator sets is missing or wrong)."""
    raw = os.environ.get(contract.ENV_MIGRATION)
    name = os.environ.get(contract.ENV_ADAPTER)
    owned = os.environ.get(contract.ENV_OWNER)
    if not raw or not name or not owned:
        raise errors.BadInput(
            f"{contract.ENV_MIGRATION}, {contract.ENV_ADAPTER} and {contract.ENV_OWNER} must be set"
        )
    try:
        fields = json.loads(owned)
        owner = ownership.Owner(str(fields["namespace"]), str(fields["name"]), str(fields["uid"]))
    except (ValueError, KeyError, TypeError) as error:
        raise errors.BadInput(f"{contract.ENV_OWNER}: not the operator's owner record") from error
    try:
        spec = AdapterMigrationSpec.model_validate_json(raw)
    except ValidationError as error:
        raise errors.BadInput(f"{contract.ENV_MIGRATION}: {error.errors()[0]['msg']}") from error
    adapter = next((a for a in spec.adapters if a.name == name), None)
    if adapter is None:
        raise errors.BadInput(f"no adapter named {name!r} in {contract.ENV_MIGRATION}")
    mounts = json.loads(os.environ.get(contract.ENV_PVC_MOUNTS) or "{}")
    where = Storage(base_dir=Path.cwd(), pvc_mounts={k: Path(v) for k, v in mounts.items()})
    return spec, adapter, where, owner


def run() -> int:
    try:
        spec, adapter, where, owner = _request()
        output = spec.output_uri(adapter.name)
        # Before loading anything (minutes on a real model): an output that is an input,
        # belongs to another migration or cannot be written fails now, as bad input (exit 3:
        # the Job is not retried).
        ownership.check_apart(spec, adapter, where)
        ownership.check_owner(spec, adapter, where, owner)
        folder = where.check_writable(output, what="spec.output")
        from relora_trainer import local_run, migrate, models  # the ML stack: slow to import
        from relora_trainer.progress import JsonLinesProgress

        local_run.quiet_libraries()
        done = migrate.finished(spec, adapter, where, owner)
        if done is not None:  # nothing to load: report what the output holds
            _write(contract.Outcome(kind="result", result=done.result()))
            return errors.EXIT_OK
        migrate.check_inputs(spec, adapter, where)  # an adapter it cannot migrate, bad data
        try:
            # Only this pod's adapter is measured on the source base (if its target needs it
            # and no earlier attempt saved that measurement).
            bases = migrate.load_bases(spec, where, models.pick_device("auto"), [adapter])
            report = migrate.migrate_adapter(
                spec=spec,
                adapter=adapter,
                bases=bases,
                storage=where,
                progress=JsonLinesProgress(),
                owner=owner,
            )
        except OSError as error:  # the output filling up or turning read-only midway
            found = storage.unwritable(error, what="spec.output", uri=output, folder=folder)
            if found is None:
                raise
            raise found from error
    except errors.BadInput as error:
        print(f"error: {error.reason}: {error}", file=sys.stderr)
        _write(contract.Outcome(kind="error", reason=error.reason, message=str(error)))
        return contract.EXIT_BAD_INPUT
    except Exception as error:  # report, then let the Job retry
        traceback.print_exc()
        reason = error.reason if isinstance(error, errors.OutputBusy) else "InternalError"
        _write(
            contract.Outcome(
                kind="error", reason=reason, message=f"{type(error).__name__}: {error}"
            )
        )
        return errors.EXIT_INTERNAL
    _write(contract.Outcome(kind="result", result=report.result()))
    return errors.EXIT_OK


if __name__ == "__main__":
    sys.exit(run())
