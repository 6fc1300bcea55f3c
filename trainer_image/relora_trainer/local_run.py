"""`relora run -f manifest.yaml`: run every adapter of a manifest on this machine."""

from __future__ import annotations

import sys
import traceback
import warnings
from typing import Any

from rich.console import Console
from rich.table import Table

from relora_api import manifests, validation
from relora_api.resource import AdapterMigration
from relora_trainer import errors, inputs, loading, migrate, models, ownership
from relora_trainer.progress import NullProgress, ProgressSink, RichProgress
from relora_trainer.report import AdapterReport
from relora_trainer.storage import Storage


def load_manifest(path: str) -> AdapterMigration:
    """The one AdapterMigration of the manifest at ``path``, validated (BadInput otherwise)."""
    return load_document(path)[1]


def load_document(path: str) -> tuple[dict[str, Any], AdapterMigration]:
    """The one AdapterMigration document of ``path`` as written, and validated (BadInput when
    there is not exactly one or it is invalid; ManifestError when the file cannot be read)."""
    documents = [
        d
        for d in manifests.read_documents(path)
        if isinstance(d.content, dict) and d.content.get("kind") == "AdapterMigration"
    ]
    if len(documents) != 1:
        raise errors.BadInput(
            f"{path}: expected exactly one AdapterMigration, found {len(documents)}"
        )
    migration, problems = validation.validate_manifest(documents[0].content)
    if migration is None:
        raise errors.BadInput("; ".join(f"{documents[0].label}: {p}" for p in problems))
    return documents[0].content, migration


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_table(reports: list[AdapterReport]) -> Table:
    table = Table(title="Migration results (validation split)")
    for column in ("adapter", "strategy", "metric", "source", "before", "after", "target"):
        table.add_column(column)
    table.add_column("ready")
    table.add_column("steps", justify="right")
    table.add_column("time to ready", justify="right")
    for r in reports:
        ttr = r.seconds["timeToReadiness"]
        table.add_row(
            r.adapter,
            r.strategy,
            r.metric,
            _fmt(r.quality_of("source")),
            _fmt(r.quality_of("before")),
            _fmt(r.quality_of("after")),
            _fmt(r.target),
            "yes" if r.ready else "NO",
            str(r.steps),
            "-" if ttr is None else f"{ttr:.1f} s",
        )
    return table


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user (deprecations, experimental APIs)."""
    import optuna
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run(
    path: str,
    *,
    only: list[str] | None = None,
    device: str = "auto",
    quiet: bool = False,
    debug: bool = False,
) -> int:
    """Run the manifest at ``path``; return the process exit code."""
    console = Console(stderr=True)
    quiet_libraries()
    try:
        migration = load_manifest(path)
        spec = migration.spec
        selected = [a for a in spec.adapters if not only or a.name in only]
        unknown = sorted(set(only or []) - {a.name for a in spec.adapters})
        if unknown:
            raise errors.BadInput(f"--adapter: no adapter named {unknown} in {path}")
        storage = Storage.for_manifest(path)
        meta = migration.metadata
        owner = ownership.Owner(namespace=meta.namespace or "default", name=meta.name)
        for adapter in selected:  # refused before minutes of model loading
            inputs.check_inputs(spec, adapter, storage)
            ownership.check_owner(spec, adapter, storage, owner)
        results: dict[str, AdapterReport] = {}
        for adapter in selected:  # finished before: nothing to load for it
            found = inputs.finished(spec, adapter, storage, owner)
            if found is not None:
                results[adapter.name] = found
                console.print(
                    f"{adapter.name}: already migrated with this spec: keeping the existing result"
                )
        todo = [a for a in selected if a.name not in results]
        processes = spec.workers * spec.processes_per_worker
        if todo and processes > 1:
            sharing = " sharing the bases" if spec.shards_base else ""
            console.print(
                f"spec.distributed asks for {processes} processes{sharing}: the operator's Job "
                "runs them; relora run migrates in this one process (the same result, to float "
                "rounding)"
            )
        if todo:
            chosen = models.pick_device(device)
            console.print(f"Loading models on {chosen} ...")
            bases = loading.load_bases(spec, storage, chosen, todo)
        sink: ProgressSink
        with RichProgress(console) if not quiet else _Quiet() as sink:
            for adapter in todo:
                results[adapter.name] = migrate.migrate_adapter(
                    spec=spec,
                    adapter=adapter,
                    bases=bases,
                    storage=storage,
                    progress=sink,
                    owner=owner,
                )
        reports = [results[a.name] for a in selected]
    except (manifests.ManifestError, errors.BadInput) as error:
        return errors.refuse(error)
    except errors.OutputBusy as error:
        print(f"error: {error.reason}: {error}", file=sys.stderr)
        return errors.EXIT_INTERNAL
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(
            f"internal error: {type(error).__name__}: {error} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return errors.EXIT_INTERNAL
    Console(width=max(Console().width, 120)).print(results_table(reports))
    for adapter in selected:
        folder = inputs.output_dir(spec, adapter, storage)
        print(f"{adapter.name}: adapter, report.json and summary.md in {folder}")
    return errors.EXIT_OK if all(r.ready for r in reports) else errors.EXIT_NOT_READY


class _Quiet(NullProgress):
    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
