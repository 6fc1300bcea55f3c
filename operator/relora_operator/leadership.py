"""Leader election on a coordination.k8s.io/v1 Lease: one replica works, the others stand by.

Two operator processes on the same resources would create nothing twice (a Job's name is
fixed) but would double every event, metric and status write. With ``RELORA_LEASE_NAMESPACE``
set (the Helm chart sets it to the release namespace), a process takes the Lease before Kopf
starts and keeps renewing it; the others wait, answering their liveness probe meanwhile. The
leader that cannot renew within ``renew deadline`` stops itself (SIGTERM: Kopf shuts down, the
kubelet restarts the container, which stands by); on a normal exit it releases the Lease so a
standby takes over at once instead of after the lease duration.

The rules are client-go's (leaderelection): a lease held by another is expired when its record
has not changed for ``leaseDurationSeconds`` as seen on this process's own clock (no clock
comparison across machines); writes use the resourceVersion, so two candidates cannot both win.

Why not Kopf's peering: replicas of one Deployment share a priority, and Kopf freezes every
operator of equal priority; and a frozen Kopf would not stop this operator's own watches and timers.
"""

from __future__ import annotations

import http.server
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from relora_api import times

LOG = logging.getLogger("relora.operator")

NAMESPACE_ENV = "RELORA_LEASE_NAMESPACE"
NAME_ENV = "RELORA_LEASE_NAME"
SECONDS_ENV = "RELORA_LEASE_SECONDS"
DEFAULT_NAME = "relora-operator"
DEFAULT_SECONDS = 15


@dataclass(frozen=True)
class LeaseConfig:
    """Where the Lease lives and how long it lasts; the periods follow client-go's ratios
    (15 s lease, 10 s renew deadline, 2 s retry)."""

    namespace: str
    name: str = DEFAULT_NAME
    duration: int = DEFAULT_SECONDS
    identity: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )

    @property
    def renew_deadline(self) -> float:
        return self.duration * 2 / 3

    @property
    def retry(self) -> float:
        return max(self.duration / 7.5, 0.2)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LeaseConfig | None:
        """None when leader election is off (RELORA_LEASE_NAMESPACE unset or empty)."""
        env = os.environ if environ is None else environ
        namespace = env.get(NAMESPACE_ENV, "")
        if not namespace:
            return None
        raw = env.get(SECONDS_ENV, str(DEFAULT_SECONDS))
        try:
            duration = int(raw)
        except ValueError:
            raise ValueError(f"{SECONDS_ENV}: not a whole number of seconds: {raw!r}") from None
        if not 1 <= duration <= 3600:
            raise ValueError(f"{SECONDS_ENV}: between 1 and 3600 seconds, got {duration}")
        return cls(namespace=namespace, name=env.get(NAME_ENV) or DEFAULT_NAME, duration=duration)


@dataclass
class Observed:
    """The lease record as last seen, and when (this process's monotonic clock)."""

    record: tuple[Any, ...] | None = None
    at: float = 0.0


def _record(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        spec.get("holderIdentity"),
        spec.get("renewTime"),
        spec.get("leaseTransitions"),
        spec.get("leaseDurationSeconds"),
    )


def _now() -> str:
    return times.micro_stamp(times.now())


def claim(
    spec: Mapping[str, Any] | None, *, me: str, duration: int, observed: Observed, now: float
) -> dict[str, Any] | None:
    """The lease spec to write to hold the lease, or None while another holds it.

    ``spec`` is the Lease's spec as read (None: no Lease yet); ``observed`` is updated with what
    was seen. A record unchanged for its duration on this clock has expired."""
    if spec is None:
        stamp = _now()
        return {
            "holderIdentity": me,
            "leaseDurationSeconds": duration,
            "acquireTime": stamp,
            "renewTime": stamp,
            "leaseTransitions": 0,
        }
    record = _record(spec)
    if record != observed.record:
        observed.record, observed.at = record, now
    holder = spec.get("holderIdentity")
    held_for = spec.get("leaseDurationSeconds") or duration
    if holder and holder != me and observed.at + held_for > now:
        return None
    stamp = _now()
    transitions = int(spec.get("leaseTransitions") or 0)
    return {
        "holderIdentity": me,
        "leaseDurationSeconds": duration,
        "acquireTime": spec.get("acquireTime") if holder == me else stamp,
        "renewTime": stamp,
        "leaseTransitions": transitions if holder == me else transitions + 1,
    }


class Elector:
    """Takes, renews and releases the Lease through the kubernetes client."""

    def __init__(self, config: LeaseConfig, api: Any) -> None:
        self.config = config
        self.coordination: Any = client.CoordinationV1Api(api)
        self.serializer = client.ApiClient()
        self.observed = Observed()
        self.stop = threading.Event()
        self.seen_holder: str | None = None  # the holder the last read found

    def _read(self) -> Any | None:
        try:
            return self.coordination.read_namespaced_lease(self.config.name, self.config.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def try_hold(self) -> bool:
        """One attempt to take or renew the lease; True when this process holds it now."""
        found = self._read()
        current = None
        if found is not None and found.spec is not None:
            current = self.serializer.sanitize_for_serialization(found.spec)
            self.seen_holder = found.spec.holder_identity
        wanted = claim(
            current,
            me=self.config.identity,
            duration=self.config.duration,
            observed=self.observed,
            now=time.monotonic(),
        )
        if wanted is None:
            return False
        try:
            if found is None:
                body = {"metadata": {"name": self.config.name}, "spec": wanted}
                self.coordination.create_namespaced_lease(self.config.namespace, body)
            else:
                body = {
                    "metadata": {
                        "name": self.config.name,
                        "resourceVersion": found.metadata.resource_version,
                    },
                    "spec": wanted,
                }
                self.coordination.replace_namespaced_lease(
                    self.config.name, self.config.namespace, body
                )
        except ApiException as error:
            if error.status == 409:  # another candidate wrote first
                return False
            raise
        return True

    def release(self) -> None:
        """Stop renewing and give the lease up (if still ours): a standby takes over at once."""
        self.stop.set()
        try:
            found = self._read()
            if found is None or found.spec.holder_identity != self.config.identity:
                return
            spec = self.serializer.sanitize_for_serialization(found.spec)
            spec.update(holderIdentity=None, renewTime=_now(), leaseDurationSeconds=1)
            body = {
                "metadata": {
                    "name": self.config.name,
                    "resourceVersion": found.metadata.resource_version,
                },
                "spec": spec,
            }
            self.coordination.replace_namespaced_lease(
                self.config.name, self.config.namespace, body
            )
            LOG.info("released the lease %s/%s", self.config.namespace, self.config.name)
        except Exception as error:  # best effort: the lease expires anyway
            LOG.warning("could not release the lease: %s", type(error).__name__)

    def wait_until_leader(self) -> bool:
        """Block until this process holds the lease (False if stopped first)."""
        said = None
        while not self.stop.is_set():
            try:
                if self.try_hold():
                    LOG.info(
                        "leading: holding the lease %s/%s as %s",
                        self.config.namespace,
                        self.config.name,
                        self.config.identity,
                    )
                    return True
                holder = self.seen_holder
                if holder != said:
                    LOG.info("standing by: the lease is held by %s", holder)
                    said = holder
            except (ApiException, OSError) as error:
                LOG.warning("leader election: %s", getattr(error, "status", type(error).__name__))
            time.sleep(self.config.retry)
        return False

    def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew until released; call ``on_lost`` when renewing failed for the renew deadline."""
        last = time.monotonic()
        while not self.stop.wait(self.config.retry):
            try:
                if self.try_hold():
                    last = time.monotonic()
                    continue
            except (ApiException, OSError) as error:
                LOG.warning("lease renewal: %s", getattr(error, "status", type(error).__name__))
            if time.monotonic() - last > self.config.renew_deadline:
                LOG.error(
                    "lost the lease %s/%s (not renewed for %.0f s): stopping",
                    self.config.namespace,
                    self.config.name,
                    self.config.renew_deadline,
                )
                on_lost()
                return


class _Alive(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"standby": true}')

    def log_message(self, format: str, *args: Any) -> None:
        return


def lead(config: LeaseConfig, api: Any, liveness: str) -> Elector:
    """Stand by (answering ``liveness`` probes) until leader; then renew in the background and
    stop the process (SIGTERM) if the lease is lost. Returns the elector (to release)."""
    elector = Elector(config, api)
    url = urlparse(liveness)
    server = http.server.ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), _Alive)
    serving = threading.Thread(target=server.serve_forever, daemon=True, name="standby-liveness")
    serving.start()
    try:
        elector.wait_until_leader()
    finally:
        server.shutdown()
        server.server_close()
    renewing = threading.Thread(
        target=elector.keep,
        args=(lambda: os.kill(os.getpid(), signal.SIGTERM),),
        daemon=True,
        name="lease-renewal",
    )
    renewing.start()
    return elector
