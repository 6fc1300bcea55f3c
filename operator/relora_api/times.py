"""Kubernetes timestamps: metav1.Time (RFC 3339, seconds, UTC ``Z``) and metav1.MicroTime
(microseconds, e.g. a Lease's renewTime), written and read in one place."""

from __future__ import annotations

import datetime


def stamp(moment: datetime.datetime) -> str:
    """metav1.Time: ``2026-12-06T19:30:00Z``."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def whole_seconds(moment: datetime.datetime) -> datetime.datetime:
    """``moment`` at metav1.Time's precision, in UTC: what ``stamp`` writes of it (the status
    models write such a datetime as ``stamp`` does)."""
    return moment.astimezone(datetime.UTC).replace(microsecond=0)


def micro_stamp(moment: datetime.datetime) -> str:
    """metav1.MicroTime: ``2026-12-06T19:30:00.123456Z``."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(value: str | None) -> datetime.datetime | None:
    """Either form back to an aware datetime; None for an unset field."""
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
