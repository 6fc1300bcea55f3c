"""Names and labels of what the operator creates: deterministic, so restarts create no twins.

Labels are explicit and never copied from the AdapterMigration (copying Argo CD's tracking label
would make Argo CD prune the Jobs).
"""

from __future__ import annotations

import hashlib

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "relora-operator"
NAME = "app.kubernetes.io/name"
TRAINER = "relora-trainer"
MIGRATION = "relora.dev/migration"
MIGRATION_UID = "relora.dev/migration-uid"
ADAPTER = "relora.dev/adapter"
QUEUE = "kueue.x-k8s.io/queue-name"
FAILURE = "relora.dev/failure"  # Job annotation: why the operator stopped it (reason: message)
TEMPLATE_HASH = "relora.dev/template-hash"  # Job annotation: what its pod template was made of
GENERATION = "relora.dev/generation"  # Job annotation: the migration's generation it was made of


def _digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:8]


RESTARTS = "relora.dev/restarts"  # Job annotation: restarts of the worker group before it
INDEX = "batch.kubernetes.io/job-completion-index"  # an Indexed Job's pod annotation


def job_name(migration: str, adapter: str, uid: str, workers: int = 1) -> str:
    """``<migration>-<adapter>-<hash>``, cut to a 63-character DNS label; with ``workers`` > 1
    cut further so that each worker's hostname ``<job>-<index>`` is one too (the API server
    refuses an Indexed Job whose last hostname would not be). A name that fits is not cut."""
    digest = _digest(migration, adapter, uid)
    stem = f"{migration[:30].rstrip('-.')}-{adapter[:22].rstrip('-')}".rstrip("-.")
    room = 63 - len(f"-{workers - 1}") if workers > 1 else 63
    if len(stem) + 1 + len(digest) > room:
        stem = stem[: room - 1 - len(digest)].rstrip("-.")
    return f"{stem}-{digest}"


def service_name(job: str) -> str:
    """The headless Service of a worker group (Job ``job``): a DNS-1035 label, so it starts with
    a letter (a migration's name may start with a digit)."""
    return job if job[:1].isalpha() else f"w{job}"[:63].rstrip("-")


def label_value(value: str) -> str:
    """A valid label value (at most 63 characters; long values keep a hash suffix)."""
    if len(value) <= 63:
        return value
    return f"{value[:54].rstrip('-._')}-{_digest(value)}"


def job_labels(migration: str, adapter: str, uid: str, queue: str | None) -> dict[str, str]:
    labels = {
        NAME: TRAINER,
        MANAGED_BY: OPERATOR,
        MIGRATION: label_value(migration),
        MIGRATION_UID: uid,
        ADAPTER: adapter,
    }
    if queue:
        labels[QUEUE] = queue
    return labels
