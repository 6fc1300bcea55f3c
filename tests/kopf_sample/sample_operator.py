"""A minimal Kopf operator for the emulator's conformance test (create/update/delete + finalizer).

Kopf keeps its progress and diff-base in annotations under its own prefix, as the real operator
does, so nothing it writes depends on the custom resource's status schema.
"""

from __future__ import annotations

from typing import Any

import kopf

GROUP, VERSION, PLURAL = "sandbox.relora.dev", "v1", "samples"


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # Reads $KUBECONFIG when called (the kubernetes client reads it once, at import time).
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.watching.server_timeout = 30
    settings.watching.client_timeout = 40


@kopf.on.create(GROUP, VERSION, PLURAL)
def created(spec: kopf.Spec, patch: kopf.Patch, **_: Any) -> None:
    patch.status["seen"] = spec.get("value")
    patch.status["handler"] = "create"


@kopf.on.update(GROUP, VERSION, PLURAL)
def updated(spec: kopf.Spec, patch: kopf.Patch, **_: Any) -> None:
    patch.status["seen"] = spec.get("value")
    patch.status["handler"] = "update"


@kopf.on.delete(GROUP, VERSION, PLURAL)
def deleted(name: str, logger: kopf.Logger, **_: Any) -> None:
    logger.info(f"cleaned up after {name}")
