"""The trainer Job's entrypoint: migrate one adapter as the operator asks (`python -m ...job`).

It runs the same code path as `relora run` (relora_trainer.migrate) and follows the contract in
relora_api.contract: the spec comes in the environment, progress goes to stdout as JSON
lines, the outcome goes to the termination message, and the exit code says whether a retry
can help (0 done, 3 bad input: never retried, anything else: retried, resuming from the
checkpoints in the output storage). An output that cannot be written (no permission, read-only,
full, a file where the folder must be) is bad input too: it is checked before the ML stack is
even imported, and a write failing the same way later ends the pod with exit 3 as well.

Launched as N data-parallel workers (torchrun, or a group of pods each given torchrun's
environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), every worker runs this
entrypoint: it joins the others first, loads the bases on its own device (the GPU of its local
rank), the data and the old adapter, and fine-tunes its share of every batch. Rank 0 alone
checks and claims the output, reports progress, writes the result and the termination message
(see relora_trainer.migrate.migrate_adapter); the others write nothing there. A failure of one
worker outside the fine-tuning itself ends every worker, a BadInput with exit 3 everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from relora_api import contract
from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_trainer import errors, ownership, storage
from relora_trainer.storage import Storage

if TYPE_CHECKING:
    from relora_trainer.distributed import World


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


def _join(spec: AdapterMigrationSpec) -> World | None:
    """The data-parallel workers this process is one of (torchrun's environment, WORLD_SIZE > 1),
    their process group joined (with a timeout that outlasts ``spec``'s search on rank 0, so
    that a worker that dies leaves no other waiting forever and a long search kills none);
    None alone (nothing imported: the checks run before the ML stack)."""
    if _workers() == 1:
        return None
    from relora_trainer import distributed

    try:
        sharded = os.environ.get(contract.ENV_SHARD_BASE) == "1"  # the operator's word
        return distributed.World.from_env(timeout=distributed.timeout(spec=spec), sharded=sharded)
    except ValueError as error:  # the launcher's environment, incomplete or inconsistent
        raise errors.BadInput(f"the workers' environment: {error}") from error


def _workers() -> int:
    """The number of workers torchrun's WORLD_SIZE says (1 when unset); BadInput when it is
    not a number."""
    try:
        return int(os.environ.get("WORLD_SIZE") or "1")
    except ValueError as error:
        raise errors.BadInput(f"WORLD_SIZE: not a number of workers ({error})") from error


@contextlib.contextmanager
def _together(world: World | None, explain: Callable[[OSError], Exception]) -> Iterator[None]:
    """A stage every worker ends together (:meth:`World.meet`): a failure in it on one worker
    fails all of them, bad input as bad input (exit 3 everywhere: an OSError as ``explain``
    makes it). Alone: nothing."""
    if world is None:
        yield
        return
    try:
        yield
    except Exception as error:
        world.meet(explain(error) if isinstance(error, OSError) else error)
        raise
    world.meet()


def run() -> int:
    world: World | None = None
    main = True  # rank 0 (or alone): writes the termination message
    failed = False
    try:
        spec, adapter, where, owner = _request()
        output = spec.output_uri(adapter.name)
        world = _join(spec)
        main = world is None or world.is_main
        folder: Path | None = None  # the output's local folder, once checked

        def explain(error: OSError) -> Exception:
            """The output filling up or turning read-only midway: bad input (exit 3)."""
            local = folder or where.local_path(output, what="spec.output")
            found = storage.unwritable(error, what="spec.output", uri=output, folder=local)
            return error if found is None else found

        done = None
        with _together(world, explain):
            if main:
                # Before loading anything (minutes on a real model): an output that is an
                # input, belongs to another migration or cannot be written fails now, as bad
                # input (exit 3: the Job is not retried). Rank 0's alone: it owns the output.
                ownership.check_apart(spec, adapter, where)
                ownership.check_owner(spec, adapter, where, owner)
                folder = where.check_writable(output, what="spec.output")
            from relora_trainer import (  # the ML stack: slow to import
                inputs,
                loading,
                local_run,
                migrate,
                models,
            )
            from relora_trainer.progress import JsonLinesProgress

            local_run.quiet_libraries()
            if main:
                done = inputs.finished(spec, adapter, where, owner)
                if done is None:
                    inputs.check_inputs(spec, adapter, where)  # an adapter it cannot migrate
        if world is not None:
            done = world.broadcast(done)
        if done is not None:  # nothing to load: report what the output holds
            if main:
                _write(contract.Outcome(kind="result", result=done.result()))
            return errors.EXIT_OK
        try:
            with _together(world, explain):
                # Only this pod's adapter is measured on the source base (if its target needs
                # it and no earlier attempt saved that measurement), by rank 0 alone.
                device = world.device if world is not None else models.pick_device("auto")
                bases = loading.load_bases(spec, where, device, [adapter], world=world)
            report = migrate.migrate_adapter(
                spec=spec,
                adapter=adapter,
                bases=bases,
                storage=where,
                progress=JsonLinesProgress() if main else None,
                owner=owner,
                world=world,
            )
        except OSError as error:  # the output filling up or turning read-only midway
            found = explain(error)
            if found is error:
                raise
            raise found from error
    except errors.BadInput as error:
        failed = True
        print(f"error: {error.reason}: {error}", file=sys.stderr)
        if main:
            _write(contract.Outcome(kind="error", reason=error.reason, message=str(error)))
        return contract.EXIT_BAD_INPUT
    except Exception as error:  # report, then let the Job retry
        failed = True
        traceback.print_exc()
        reason = error.reason if isinstance(error, errors.OutputBusy) else "InternalError"
        if main:
            _write(
                contract.Outcome(
                    kind="error", reason=reason, message=f"{type(error).__name__}: {error}"
                )
            )
        return errors.EXIT_INTERNAL
    finally:
        if world is not None:
            world.close(failed=failed)
    if main:
        _write(contract.Outcome(kind="result", result=report.result()))
    return errors.EXIT_OK


def _exit(code: int) -> None:
    """Exit with ``code``. A worker of a group (torchrun's WORLD_SIZE > 1) skips the
    interpreter's and C++ runtime's teardown once its work is done and reported: gloo's threads
    can abort the process there ("terminate called without an active exception", pytorch#28126;
    seen in CI after a successful group and after a failed one, exit -6), and the Job's success
    and failure policy must read the code this process chose (3: no retry)."""
    try:
        grouped = _workers() > 1
    except errors.BadInput:  # said already, with its exit code: no group was joined
        grouped = False
    if grouped:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(run())
