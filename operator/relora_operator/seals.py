"""Seals on finished outcomes: the status cannot be made to say what the operator did not measure.

Anyone allowed to patch ``adaptermigrations/status`` could write ``phase: Succeeded`` over a
failed adapter, and Ready gates rollouts. So the operator signs each finished adapter entry
it writes (HMAC-SHA256 over the migration's uid and the entry, with a key only the operator
holds: ``RELORA_SEAL_KEY``, a Secret the Helm chart creates) and checks the signature on every
reconciliation: an entry that does not carry its seal is not the operator's, and is derived
again from what the cluster holds (the Job and its pod's termination message; a new Job, which
finds the finished result in the output, when the Job is gone).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from typing import Any

SEAL_FIELD = "seal"
KEY_ENV = "RELORA_SEAL_KEY"
MIN_KEY_LENGTH = 32


def sign(key: bytes, uid: str, entry: Mapping[str, Any]) -> str:
    """The seal of ``entry`` (an adapter's status, wire form) of the migration ``uid``."""
    body = {k: v for k, v in entry.items() if k != SEAL_FIELD}
    text = json.dumps([uid, body], sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def genuine(key: bytes, uid: str, entry: Mapping[str, Any]) -> bool:
    """Whether ``entry`` carries the seal the operator gave it."""
    seal = entry.get(SEAL_FIELD)
    return isinstance(seal, str) and hmac.compare_digest(seal, sign(key, uid, entry))


def key_from_env(environ: Mapping[str, str] | None = None) -> tuple[bytes, bool]:
    """The key from ``RELORA_SEAL_KEY``, and whether it was set. Unset: a random key for this
    process (finished outcomes are then re-derived after a restart); too short: ValueError."""
    env = os.environ if environ is None else environ
    value = env.get(KEY_ENV)
    if value is None:
        return secrets.token_bytes(32), False
    if len(value.strip()) < MIN_KEY_LENGTH:
        raise ValueError(
            f"{KEY_ENV}: at least {MIN_KEY_LENGTH} characters (a random secret; the Helm chart "
            "generates one)"
        )
    return value.strip().encode(), True
