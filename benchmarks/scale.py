"""Scale benchmark: many AdapterMigrations against the sandbox, the operator vs a plain Kopf floor.

    python benchmarks/scale.py --migrations 1000 --out .relora/scale

For each subject, a fresh sandbox (relora_sandbox: API emulator + Job runner, as cold as a new
API server: fresh_sandbox) runs in this process; the operator runs as its own process watching
one namespace. The migrations (one adapter each) are created in batches, in-process on the
sandbox's loop (so every HTTP request the emulator counts is the operator's); a batch waits
until the previous one has its Jobs. The trainer is a stand-in that writes a "ready" outcome
as its termination message and exits (`/bin/sh -c 'printf ...'`), so a pod costs one small
process.

Measured, per subject: creation -> Job latency (the store's own ADDED events, monotonic clock,
sub-second), creation -> Ready (the operator: the migration's Ready condition; the floor, which
writes no status: its Job's Complete condition), time until every migration is Ready, the
operator process's peak RSS and CPU seconds (/proc), and its API requests by verb and resource.

Subjects: ``relora`` (python -m relora_operator, as the Helm chart runs it: --log-format=json)
and ``floor`` (benchmarks/floor_operator.py: one @kopf.on.create handler creating the Job).
Writes scale-report.json and scale-report.md under --out and prints the table.

With ``--steady N`` each subject also runs, in a fresh sandbox, N migrations whose trainers keep
running (a progress line every ``--progress-every`` seconds): once all N pods run and
``--settle`` seconds passed, the API requests of ``--window`` seconds give the steady-state
requests per second (progress reads, ``get pods/log``, counted apart). Then the N are deleted
and ``--churn-cycles`` cycles each create ``--churn-size`` migrations, wait until their pods
run, and delete them: the operator's resident memory (VmRSS) after the first cycle and after
the last one says whether anything it keeps per migration outlives the migration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from relora_sandbox import processes

ROOT = Path(__file__).resolve().parent.parent
FLOOR = Path(__file__).resolve().parent / "floor_operator.py"
CRD_FILE = ROOT / "crds" / "adaptermigrations.relora.dev.yaml"
GROUP, VERSION, PLURAL = "relora.dev", "v1alpha1", "adaptermigrations"
NAMESPACE = "scale"
SUBJECTS = ("relora", "floor")
Obj = dict[str, Any]


# ---------------------------------------------------------------------- the stand-in trainer
def stand_in_command(hold: int = 0, every: int = 1) -> list[str]:
    """A trainer that reports a ready adapter per relora_api.contract and exits 0; with
    ``hold``, it first runs that many seconds, writing a progress line every ``every``."""
    from relora_api import contract
    from relora_api.status import AdapterResult

    outcome = contract.Outcome(
        kind="result",
        result=AdapterResult(
            ready=True,
            strategy="relora",
            output_uri="pvc://scale/out",
            metric="accuracy",
            target=0.9,
            quality_source=0.95,
            quality_before=0.6,
            quality_after=0.95,
            steps=0,
            time_to_readiness_seconds=0.0,
        ),
    ).encode()
    script = f'printf %s {shlex.quote(outcome)} > "${contract.ENV_TERMINATION_LOG}"'
    if hold > 0:
        line = shlex.quote('{"event":"progress","stage":"finetune","step":%d,"maxSteps":%d}\\n')
        step = f'printf {line} "$i" {hold}; sleep {every}; i=$((i + {every}))'
        loop = f'i=0; while [ "$i" -lt {hold} ]; do {step}; done'
        script = f"{loop}; {script}"
    return ["/bin/sh", "-c", script]


def migration(name: str, namespace: str = NAMESPACE) -> Obj:
    """An AdapterMigration with one adapter (its trainer is the stand-in)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterMigration",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "sourceModel": {"uri": "pvc://models/v1"},
            "targetModel": {"uri": "pvc://models/v2"},
            "adapters": [
                {
                    "name": "task",
                    "uri": f"pvc://adapters/{name}",
                    "data": {
                        "train": "pvc://data/train.jsonl",
                        "validation": "pvc://data/validation.jsonl",
                    },
                    "readiness": {"target": 0.9},
                }
            ],
            "output": {"uri": f"pvc://out/{name}"},
        },
    }


# ---------------------------------------------------------------------- what the sandbox sees
def classify(method: str, path: str, query: Any) -> str:
    """``verb resource[/subresource]`` of an API request, as RBAC names them."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        rest = parts[3:]
    else:
        return "discovery"
    if not rest:
        return "discovery"
    if rest[0] == "namespaces" and len(rest) >= 3:
        rest = rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    if method == "GET":
        if name is not None:
            verb = "get"
        elif query.get("watch") in ("1", "true"):
            verb = "watch"
        else:
            verb = "list"
    else:
        verb = verbs.get(method, method.lower())
    return f"{verb} {resource}"


def _ready(obj: Obj, kind: str) -> bool:
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def _owner(obj: Obj) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


@dataclass
class Recorder:
    """Times of what happens in the store (called on the sandbox's loop) and API requests."""

    counting: bool = False
    requests: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)  # plural -> store events
    pods: int = 0  # pods created (one per Job unless a trainer failed and was retried)
    created: dict[str, float] = field(default_factory=dict)  # migration uid -> time
    jobs: dict[str, list[float]] = field(default_factory=dict)  # migration uid -> Job ADDED
    completed: dict[str, float] = field(default_factory=dict)  # migration uid -> Job Complete
    ready: dict[str, float] = field(default_factory=dict)  # migration uid -> Ready condition
    running: set[str] = field(default_factory=set)  # uids of pods in phase Running now
    phases: dict[str, str] = field(default_factory=dict)  # migration uid -> status.phase
    children: int = 0  # Jobs and pods that exist now

    def on_request(self, request: Any) -> None:
        if self.counting:
            self.requests[classify(request.method, request.path, request.query)] += 1

    def on_change(self, type_: str, kind: Any, obj: Obj, old: Obj | None) -> None:
        moment = time.monotonic()
        if self.counting:
            self.events[kind.plural] += 1
        if kind.key in (("", "pods"), ("batch", "jobs")):
            self.children += {"ADDED": 1, "DELETED": -1}.get(type_, 0)
        if kind.key == ("", "pods"):
            self.pods += type_ == "ADDED"
            phase = (obj.get("status") or {}).get("phase")
            if type_ != "DELETED" and phase == "Running":
                self.running.add(obj["metadata"]["uid"])
            else:
                self.running.discard(obj["metadata"]["uid"])
        if kind.key == (GROUP, PLURAL):
            uid = obj["metadata"]["uid"]
            if type_ == "ADDED":
                self.created[uid] = moment
            elif uid not in self.ready and _ready(obj, "Ready"):
                self.ready[uid] = moment
            if type_ == "DELETED":
                self.phases.pop(uid, None)
            else:
                self.phases[uid] = str((obj.get("status") or {}).get("phase", ""))
        elif kind.key == ("batch", "jobs"):
            owner = _owner(obj)
            if owner is None:
                return
            if type_ == "ADDED":
                self.jobs.setdefault(owner, []).append(moment)
            elif owner not in self.completed and _ready(obj, "Complete"):
                self.completed[owner] = moment


# ---------------------------------------------------------------------- the operator process
def operator_argv(subject: str, liveness: int) -> list[str]:
    common = [
        "--standalone",
        "--namespace",
        NAMESPACE,
        f"--liveness={processes.liveness_url(liveness)}",
        "--log-format=json",
    ]
    if subject == "relora":
        return [sys.executable, "-m", "relora_operator", *common]
    return [sys.executable, "-m", "kopf", "run", *common, str(FLOOR)]


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MiB) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return cpu, peak


def proc_rss(pid: int) -> float:
    """Resident memory (VmRSS) of a live process now, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_operator(
    subject: str, kubeconfig: Path, log: Path, metrics_port: int, trainer: list[str]
) -> subprocess.Popen[bytes]:
    liveness = processes.free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "RELORA_TRAINER_COMMAND": json.dumps(trainer),
        "RELORA_METRICS_PORT": str(metrics_port),
    }
    log.write_bytes(b"")
    return processes.start_live(
        operator_argv(subject, liveness),
        env=env,
        log=log,
        liveness_port=liveness,
        timeout=120,
        cwd=ROOT,
    )


# ---------------------------------------------------------------------- one subject
def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(-(-fraction * len(ordered) // 1)) - 1))
    return ordered[rank]


def _steady(thread: Any, recorder: Recorder, migrations: int, timeout: float) -> Obj | None:
    """API requests per running migration per minute, while every migration's trainer runs
    (from the last Job's creation to the first completion)."""
    first = recorder.completed

    def counts() -> Counter[str]:
        return Counter(recorder.requests)

    if first or not _wait(partial(_at_least, recorder.jobs, migrations), timeout):
        return None
    started, before = time.monotonic(), thread.call(counts)
    if not _wait(partial(_at_least, first, 1), timeout):
        return None
    seconds, after = time.monotonic() - started, thread.call(counts)
    if seconds < 5:
        return None
    rate = 60.0 / seconds / migrations
    by_kind = {k: (after[k] - before[k]) * rate for k in sorted(after) if after[k] > before[k]}
    return {"windowSeconds": seconds, "total": sum(by_kind.values()), "byKind": by_kind}


def _at_least(found: dict[str, Any], count: int) -> bool:
    return len(found) >= count


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


QUIET_SECONDS = 1.0


def _quiet(thread: Any, recorder: Recorder, seconds: float, timeout: float) -> None:
    """Return once no API request came for ``seconds`` (or after ``timeout``)."""

    def count() -> int:
        return sum(recorder.requests.values())

    deadline = time.monotonic() + timeout
    last, since = thread.call(count), time.monotonic()
    while time.monotonic() - since < seconds and time.monotonic() < deadline:
        time.sleep(0.05)
        now = thread.call(count)
        if now != last:
            last, since = now, time.monotonic()


def fresh_sandbox(workdir: Path) -> Any:
    """A new sandbox (not started) as cold as a new API server: the CEL verdicts that the
    emulator memoizes process-wide are dropped, or the subject measured second would create its
    migrations (the same specs) at a fraction of the first one's cost."""
    from relora_sandbox import schema
    from relora_sandbox.sandbox import SandboxThread

    schema.forget_verdicts()
    return SandboxThread(workdir)


def _setup(emulator: Any, recorder: Recorder) -> None:
    """The CRD, the namespace, and the recorder listening (on the sandbox's loop)."""
    registry = emulator.registry.kinds
    crds = registry[("apiextensions.k8s.io", "v1", "customresourcedefinitions")]
    emulator.create(crds, "", yaml.safe_load(CRD_FILE.read_text()))
    emulator.create(registry[("", "v1", "namespaces")], "", {"metadata": {"name": NAMESPACE}})
    emulator.store.listeners.append(recorder.on_change)
    emulator.request_hooks.append(recorder.on_request)


def run_steady(
    subject: str,
    migrations: int,
    workdir: Path,
    *,
    settle: float,
    window: float,
    every: int,
    cycles: int,
    size: int,
    timeout: float,
) -> Obj:
    """Steady-state requests per second with ``migrations`` trainers running (and, for the
    operator, every migration's status saying so), then the operator's memory over
    create/delete cycles (see the module doc)."""
    workdir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder()
    thread = fresh_sandbox(workdir / "sandbox")
    box = thread.__enter__()
    emulator = box.emulator
    try:
        thread.call(_setup, emulator, recorder)
        kind = emulator.kind(GROUP, VERSION, PLURAL)
        recorder.counting = True
        process = start_operator(
            subject,
            box.kubeconfig_path,
            workdir / f"{subject}.log",
            processes.free_port(),
            stand_in_command(hold=100_000, every=every),
        )
        try:

            def create(names: list[str]) -> None:
                for name in names:
                    emulator.create(kind, NAMESPACE, migration(name))

            def delete(names: list[str]) -> None:
                for name in names:
                    if emulator.store.find(kind, NAMESPACE, name) is not None:
                        emulator.delete(kind, NAMESPACE, name)

            def populate(names: list[str]) -> bool:
                for start in range(0, len(names), 50):
                    thread.call(create, names[start : start + 50])
                return _wait(lambda: len(recorder.running) >= len(names), timeout)

            def empty(names: list[str]) -> bool:
                thread.call(delete, names)
                gone = _wait(lambda: recorder.children <= 0, timeout)
                time.sleep(min(settle, 5.0))  # the operator hears of the deletions
                return gone

            names = [f"s{i:05d}" for i in range(migrations)]
            running = populate(names)
            if subject == "relora":  # and its status says so: the operator caught up
                running = running and _wait(
                    lambda: sum(p == "Running" for p in recorder.phases.values()) >= migrations,
                    timeout,
                )
            time.sleep(settle)
            before, cpu_before = Counter(recorder.requests), proc_usage(process.pid)[0]
            time.sleep(window)
            after, cpu_after = Counter(recorder.requests), proc_usage(process.pid)[0]
            by_kind = {
                k: (after[k] - before[k]) / window for k in sorted(after) if after[k] > before[k]
            }
            logs = by_kind.get("get pods/log", 0.0)
            steady = {
                "migrations": migrations,
                "allRunning": running,
                "windowSeconds": window,
                "requestsPerSecond": sum(by_kind.values()),
                "progressReadsPerSecond": logs,
                "otherRequestsPerSecond": sum(by_kind.values()) - logs,
                "byKind": by_kind,
                "operatorCpuPerSecond": (cpu_after - cpu_before) / window,
                "operatorRssMiB": proc_rss(process.pid),
            }
            emptied = empty(names)
            rss = []
            for cycle in range(cycles):
                batch = [f"c{cycle}-{i:05d}" for i in range(size)]
                running = populate(batch) and running
                emptied = empty(batch) and emptied
                rss.append(proc_rss(process.pid))
            churn = {
                "cycles": cycles,
                "size": size,
                "allRunningAndDeleted": running and emptied,
                "rssMiB": rss,
                "rssBeforeMiB": rss[0] if rss else None,
                "rssAfterMiB": rss[-1] if rss else None,
            }
        finally:
            processes.stop(process, timeout=20)
    finally:
        thread.__exit__(None, None, None)
    return {"subject": subject, "steady": steady, "churn": churn}


def run_subject(
    subject: str, migrations: int, workdir: Path, *, batch: int, timeout: float, hold: int = 0
) -> Obj:
    """Run ``migrations`` AdapterMigrations through one operator; return its measurements."""
    workdir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder()
    thread = fresh_sandbox(workdir / "sandbox")
    box = thread.__enter__()
    emulator = box.emulator
    try:
        thread.call(_setup, emulator, recorder)
        kind = emulator.kind(GROUP, VERSION, PLURAL)

        def create(name: str) -> None:
            emulator.create(kind, NAMESPACE, migration(name))

        own_cpu = _own_cpu()
        recorder.counting = True
        started_operator = time.monotonic()
        metrics_port = processes.free_port()
        process = start_operator(
            subject,
            box.kubeconfig_path,
            workdir / f"{subject}.log",
            metrics_port,
            stand_in_command(hold),
        )
        live_seconds = time.monotonic() - started_operator
        startup_cpu, _ = proc_usage(process.pid)
        try:
            first = time.monotonic()
            names = [f"m{i:05d}" for i in range(migrations)]
            for start in range(0, migrations, batch):
                for name in names[start : start + batch]:  # one at a time: the API serves meanwhile
                    thread.call(create, name)
                if not _wait(
                    partial(_at_least, recorder.jobs, min(start + batch, migrations)), timeout
                ):
                    break
            steady = _steady(thread, recorder, migrations, timeout) if hold else None
            target = recorder.completed if subject == "floor" else recorder.ready
            finished = _wait(partial(_at_least, target, migrations), timeout)
            end = time.monotonic()
            # What the operator still does once everything is Ready (its events, posted one
            # at a time) counts too: until it has made no request for a second.
            _quiet(thread, recorder, QUIET_SECONDS, timeout)
            quiet = round(max(0.0, time.monotonic() - end - QUIET_SECONDS), 1)  # polled
            recorder.counting = False
            cpu, peak = proc_usage(process.pid)
            reconciles = _reconciles(metrics_port) if subject == "relora" else None
            own_cpu = _own_cpu() - own_cpu
        finally:
            processes.stop(process, timeout=20)

        def final_state() -> tuple[int, int, dict[str, int]]:
            items, _ = emulator.store.select(kind, NAMESPACE)
            jobs, _ = emulator.store.select(emulator.kind("batch", "v1", "jobs"), NAMESPACE)
            per_owner = Counter(_owner(j) for j in jobs)
            ready = sum(_ready(i, "Ready") for i in items)
            one_job = sum(per_owner[i["metadata"]["uid"]] == 1 for i in items)
            histogram: Counter[int] = Counter(per_owner.values())
            return ready, one_job, {str(jobs): count for jobs, count in sorted(histogram.items())}

        ready_now, one_job, jobs_histogram = thread.call(final_state)
    finally:
        thread.__exit__(None, None, None)
    to_job = [
        recorder.jobs[uid][0] - made
        for uid, made in recorder.created.items()
        if uid in recorder.jobs
    ]
    ends = recorder.completed if subject == "floor" else recorder.ready
    to_ready = [ends[uid] - made for uid, made in recorder.created.items() if uid in ends]
    requests = dict(sorted(recorder.requests.items(), key=lambda item: (-item[1], item[0])))
    total = sum(requests.values())
    return {
        "subject": subject,
        "migrations": migrations,
        "batch": batch,
        "finished": finished,
        "readyDefinition": "Job Complete" if subject == "floor" else "Ready condition True",
        "migrationsReady": ready_now if subject == "relora" else len(recorder.completed),
        "migrationsWithExactlyOneJob": one_job,
        "podsPerMigration": recorder.pods / migrations,
        "jobsPerMigration": jobs_histogram,
        "createToJobSeconds": _quantiles(to_job),
        "createToReadySeconds": _quantiles(to_ready),
        "timeToAllJobsSeconds": _span(first, recorder.jobs.values(), migrations),
        "timeToAllReadySeconds": (end - first) if finished else None,
        "busyAfterReadySeconds": quiet,
        "operatorStartSeconds": live_seconds,
        "operatorStartupCpuSeconds": startup_cpu,
        "operatorCpuSeconds": cpu,
        "operatorPeakRssMiB": peak,
        "sandboxCpuSeconds": own_cpu,
        "reconciles": reconciles,
        "storeEventsPerMigration": {
            kind: count / migrations for kind, count in sorted(recorder.events.items())
        },
        "steady": steady,
        "apiRequests": total,
        "apiRequestsPerMigration": total / migrations,
        "apiRequestsByKind": requests,
    }


def _reconciles(port: int) -> float | None:
    """relora_reconcile_total from the operator's metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("relora_reconcile_total "):
            return float(line.split()[1])
    return None


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _quantiles(values: list[float]) -> Obj:
    return {
        "count": len(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


def _span(first: float, times: Any, expected: int) -> float | None:
    firsts = [t[0] for t in times]
    return (max(firsts) - first) if len(firsts) >= expected else None


# ---------------------------------------------------------------------- the report
def _optional(section: str, key: str) -> Callable[[Obj], float | None]:
    """A row's value from a phase that may not have run (None: that phase was not asked for)."""
    return lambda r: r[section][key] if r.get(section) else None


ROWS: list[tuple[str, Callable[[Obj], float | None], str]] = [
    ("create -> Job p50 (s)", lambda r: r["createToJobSeconds"]["p50"], "{:.3f}"),
    ("create -> Job p99 (s)", lambda r: r["createToJobSeconds"]["p99"], "{:.3f}"),
    ("create -> Ready p50 (s)", lambda r: r["createToReadySeconds"]["p50"], "{:.3f}"),
    ("create -> Ready p99 (s)", lambda r: r["createToReadySeconds"]["p99"], "{:.3f}"),
    ("time to all Jobs (s)", lambda r: r["timeToAllJobsSeconds"], "{:.1f}"),
    ("time to all Ready (s)", lambda r: r["timeToAllReadySeconds"], "{:.1f}"),
    ("requests after all Ready, until quiet (s)", lambda r: r["busyAfterReadySeconds"], "{:.1f}"),
    ("operator peak RSS (MiB)", lambda r: r["operatorPeakRssMiB"], "{:.0f}"),
    ("operator CPU (s)", lambda r: r["operatorCpuSeconds"], "{:.1f}"),
    ("  of which start-up (s)", lambda r: r["operatorStartupCpuSeconds"], "{:.1f}"),
    ("sandbox CPU (s)", lambda r: r["sandboxCpuSeconds"], "{:.1f}"),
    (
        "reconciliations per migration",
        lambda r: r["reconciles"] / r["migrations"] if r["reconciles"] is not None else None,
        "{:.2f}",
    ),
    ("API requests per migration", lambda r: r["apiRequestsPerMigration"], "{:.2f}"),
    (
        "  of which events",
        lambda r: r["apiRequestsByKind"].get("create events", 0) / r["migrations"],
        "{:.2f}",
    ),
    (
        "requests / running migration / min",
        _optional("steady", "total"),
        "{:.2f}",
    ),
    (
        "steady: requests/s, all trainers running",
        _optional("steadyState", "requestsPerSecond"),
        "{:.2f}",
    ),
    (
        "  of which progress reads/s",
        _optional("steadyState", "progressReadsPerSecond"),
        "{:.2f}",
    ),
    (
        "steady: operator CPU s/s",
        _optional("steadyState", "operatorCpuPerSecond"),
        "{:.3f}",
    ),
    (
        "steady: operator RSS (MiB)",
        _optional("steadyState", "operatorRssMiB"),
        "{:.0f}",
    ),
    (
        "churn: RSS after first cycle (MiB)",
        _optional("churn", "rssBeforeMiB"),
        "{:.1f}",
    ),
    (
        "churn: RSS after last cycle (MiB)",
        _optional("churn", "rssAfterMiB"),
        "{:.1f}",
    ),
]


# Rows that only --steady fills.
STEADY_ROWS = {label for label, _, _ in ROWS if label.startswith(("steady:", "churn:"))} | {
    "  of which progress reads/s"
}


def _cell(value: float | None, form: str) -> str:
    return "n/a" if value is None else form.format(value)


def table(results: dict[str, Obj]) -> list[list[str]]:
    """Rows of [metric, relora, floor, ratio]."""
    rows = []
    for label, pick, form in ROWS:
        ours = pick(results["relora"]) if "relora" in results else None
        floor = pick(results["floor"]) if "floor" in results else None
        if ours is None and floor is None:
            continue
        ratio = f"{ours / floor:.2f}x" if ours is not None and floor else "n/a"
        rows.append([label, _cell(ours, form), _cell(floor, form), ratio])
    return rows


def requests_table(results: dict[str, Obj]) -> list[list[str]]:
    kinds = sorted({k for r in results.values() for k in r["apiRequestsByKind"]})
    rows = []
    for kind in kinds:
        row = [kind]
        for subject in SUBJECTS:
            if subject in results:
                result = results[subject]
                count = result["apiRequestsByKind"].get(kind, 0)
                row.append(f"{count} ({count / result['migrations']:.2f})")
            else:
                row.append("n/a")
        rows.append(row)
    return rows


def markdown(report: Obj) -> str:
    results = report["results"]
    lines = [
        f"# Scale: {report['migrations']} AdapterMigrations (one adapter each)",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}`.",
        "Floor: a plain Kopf operator (one @kopf.on.create handler that creates the Job); its",
        "Ready is the Job's Complete condition (it writes no status).",
        "",
        "| metric | relora-operator | plain Kopf floor | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {' | '.join(row)} |" for row in table(results)]
    lines += [
        "",
        "API requests by verb and resource (total, per migration):",
        "",
        "| request | relora-operator | floor |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {' | '.join(row)} |" for row in requests_table(results)]
    lines += ["", "Store events per migration (what a watch of that resource receives):", ""]
    for subject, result in results.items():
        events = ", ".join(f"{k} {v:.1f}" for k, v in result["storeEventsPerMigration"].items())
        lines.append(f"- {subject}: {events}")
    steady = {s: r["steady"] for s, r in results.items() if r.get("steady")}
    if steady:
        lines += [
            "",
            f"While every trainer runs ({report['holdSeconds']} s each, one progress line a "
            "second), API requests per running migration per minute:",
            "",
        ]
        for subject, window in steady.items():
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in window["byKind"].items())
            lines.append(
                f"- {subject}: {window['total']:.1f} ({kinds or 'none'}; "
                f"window {window['windowSeconds']:.0f} s)"
            )
    states = {s: r for s, r in results.items() if r.get("steadyState")}
    if states:
        first = next(iter(states.values()))
        lines += [
            "",
            f"Steady state, {first['steadyState']['migrations']} trainers running (a progress "
            f"line every {report.get('progressEvery', '?')} s), requests per second over "
            f"{first['steadyState']['windowSeconds']:.0f} s; then "
            f"{first['churn']['cycles']} create/delete cycles of {first['churn']['size']} "
            "migrations, the operator's VmRSS after each:",
            "",
        ]
        for subject, result in states.items():
            state, churn = result["steadyState"], result["churn"]
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in state["byKind"].items())
            rss = " / ".join(f"{v:.1f}" for v in churn["rssMiB"])
            lines.append(
                f"- {subject}: {state['requestsPerSecond']:.2f} requests/s ({kinds or 'none'}); "
                f"all running: {state['allRunning']}; RSS over the cycles (MiB): {rss}; all "
                f"running and deleted each cycle: {churn['allRunningAndDeleted']}"
            )
    lines += [""]
    for subject, result in results.items():
        lines.append(
            f"- {subject}: {result['migrationsReady']}/{result['migrations']} ready "
            f"({result['readyDefinition']}), {result['migrationsWithExactlyOneJob']} with exactly "
            f"one Job, finished in time: {result['finished']}"
        )
    return "\n".join(lines) + "\n"


def printable(report: Obj) -> str:
    rows = [["metric", "relora-operator", "floor", "ratio"], *table(report["results"])]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells))
    return "\n".join(out)


@dataclass
class Steady:
    """The steady-state and churn phase (--steady)."""

    migrations: int
    settle: float = 30.0
    window: float = 200.0
    every: int = 10
    cycles: int = 5
    size: int = 200


def run(
    *,
    migrations: int,
    out: Path,
    batch: int = 50,
    timeout: float | None = None,
    subjects: tuple[str, ...] = SUBJECTS,
    command: str = "",
    hold: int = 0,
    steady: Steady | None = None,
) -> Obj:
    """The benchmark's core: every subject in turn, then scale-report.json and .md in ``out``."""
    out = out.resolve()  # pods run in their own folders: every path they get must be absolute
    out.mkdir(parents=True, exist_ok=True)
    limit = timeout if timeout is not None else 60.0 + 0.5 * migrations + hold
    results = {
        subject: run_subject(
            subject, migrations, out / subject, batch=batch, timeout=limit, hold=hold
        )
        for subject in subjects
    }
    if steady is not None:
        for subject in subjects:
            found = run_steady(
                subject,
                steady.migrations,
                out / f"{subject}-steady",
                settle=steady.settle,
                window=steady.window,
                every=steady.every,
                cycles=steady.cycles,
                size=steady.size,
                timeout=timeout if timeout is not None else 60.0 + 0.5 * steady.migrations,
            )
            results[subject]["steadyState"] = found["steady"]
            results[subject]["churn"] = found["churn"]
    report = {
        "migrations": migrations,
        "batch": batch,
        "holdSeconds": hold,
        "progressEvery": steady.every if steady is not None else None,
        "machine": f"{os.cpu_count()} CPU cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}",
        "command": command or f"python benchmarks/scale.py --migrations {migrations}",
        "results": results,
        "ratios": {
            row[0]: row[3] for row in table(results) if "relora" in results and "floor" in results
        },
    }
    (out / "scale-report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scale-report.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--migrations", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50, help="migrations created at once")
    parser.add_argument("--out", type=Path, default=Path(".relora/scale"))
    parser.add_argument("--timeout", type=float, default=None, help="seconds per wait")
    parser.add_argument("--only", choices=SUBJECTS, action="append", help="run only this subject")
    parser.add_argument(
        "--hold",
        type=int,
        default=0,
        help="seconds each trainer runs (printing progress) before it reports: measures the "
        "requests per running migration",
    )
    parser.add_argument(
        "--steady",
        type=int,
        default=0,
        help="also measure the requests per second with this many trainers running, and the "
        "operator's memory over create/delete cycles (0: not)",
    )
    parser.add_argument("--settle", type=float, default=30.0, help="seconds before measuring")
    parser.add_argument(
        "--window",
        type=float,
        default=200.0,
        help="seconds measured (a progress period or more: 200 s at 1,000 running)",
    )
    parser.add_argument("--progress-every", type=int, default=10, help="trainer progress period")
    parser.add_argument("--churn-cycles", type=int, default=5)
    parser.add_argument("--churn-size", type=int, default=200)
    args = parser.parse_args(argv)
    command = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(
        migrations=args.migrations,
        out=args.out,
        batch=args.batch,
        timeout=args.timeout,
        subjects=tuple(args.only or SUBJECTS),
        command=command.strip(),
        hold=args.hold,
        steady=Steady(
            args.steady,
            settle=args.settle,
            window=args.window,
            every=args.progress_every,
            cycles=args.churn_cycles,
            size=args.churn_size,
        )
        if args.steady
        else None,
    )
    print(printable(report))
    print(f"\nreport: {args.out / 'scale-report.md'}")
    results = report["results"].values()
    return 0 if all(r["finished"] for r in results) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
