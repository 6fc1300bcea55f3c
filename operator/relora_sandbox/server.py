"""The HTTP face of the emulator: discovery, CRUD, PATCH, watch, Table printing and pod logs."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from aiohttp import web

from relora_sandbox import errors, openapi, patching, tables
from relora_sandbox.admission import Admission
from relora_sandbox.kinds import GROUP_PRIORITY, Kind, Registry
from relora_sandbox.selectors import field_matcher, label_matcher
from relora_sandbox.store import Event, Obj, Store, Watch

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-relora-sandbox",
    "platform": "linux/amd64",
    "goVersion": "go1.23",
    "compiler": "gc",
    "gitCommit": "",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
}
SUBRESOURCES = {"status", "log", "finalize", "scale"}

LogSource = Callable[[str, str], str | None]
LogAge = Callable[[str, str], float | None]  # seconds since the log was last written
AdminHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


T = TypeVar("T")


@dataclass
class Target:
    """What a request path names."""

    kind: Kind
    namespace: str | None  # None: all namespaces (lists and watches)
    name: str | None
    subresource: str | None


class Emulator:
    """A Kubernetes API server stand-in, served by aiohttp."""

    def __init__(self, *, bookmark_interval: float = 5.0, history: int = 10_000) -> None:
        self.registry = Registry.with_builtins()
        self.store = Store(self.registry, history=history)
        self.admission = Admission(self.registry, self.store)
        self.bookmark_interval = bookmark_interval
        self.requests: Counter[str] = Counter()
        # Called with every request before it is served (tests audit who calls what).
        self.request_hooks: list[Callable[[web.Request], None]] = []
        self.log_source: LogSource | None = None
        self.log_age: LogAge | None = None
        self.admin: dict[tuple[str, str], AdminHandler] = {}
        self.delay_seconds = 0.0  # fault injection: slow responses
        namespaces = self.registry.kinds[("", "v1", "namespaces")]
        for name in ("default", "kube-system", "kube-public"):
            self.create(namespaces, "", {"metadata": {"name": name}})
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)

    # ---------------------------------------------------------------- in-process API
    def create(
        self, kind: Kind, namespace: str, body: Obj, *, strict: bool = False
    ) -> tuple[Obj, list[str]]:
        """Admit and store a new object; return it with warnings about unknown fields."""
        warnings = self.admission.on_create(kind, body, strict=strict)
        created = self.store.create(kind, namespace, body)
        self.admission.after_write(kind, created)
        self._schedule_dangling_check(kind, created)
        return created, warnings

    def update(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        body: Obj,
        *,
        status: bool,
        strict: bool = False,
    ) -> tuple[Obj, list[str]]:
        current = self.store.get(kind, namespace, name)
        candidate = copy.deepcopy(body)
        if status:  # validate what the stored object would become
            merged = copy.deepcopy(current)
            merged["status"] = candidate.get("status")
            if merged["status"] is None:
                merged.pop("status")
            merged["metadata"]["resourceVersion"] = candidate.get("metadata", {}).get(
                "resourceVersion", current["metadata"]["resourceVersion"]
            )
            candidate = merged
        warnings = self.admission.on_update(kind, candidate, current, strict=strict)
        updated = self.store.replace(kind, namespace, name, candidate, status=status)
        self.admission.after_write(kind, updated)
        self.store.finish_foreground()
        return updated, warnings

    def delete(self, kind: Kind, namespace: str, name: str, propagation: str | None = None) -> Obj:
        deleted = self.store.delete(kind, namespace, name, propagation=propagation)
        if self.store.find(kind, namespace, name) is None:
            self.admission.after_delete(kind, deleted)
        self.store.finish_foreground()
        return deleted

    def kind(self, group: str, version: str, plural: str) -> Kind:
        found = self.registry.get(group, version, plural)
        if found is None:
            raise errors.not_found("resource", f"{plural}.{group}/{version}")
        return found

    def _schedule_dangling_check(self, kind: Kind, obj: Obj) -> None:
        if obj["metadata"].get("ownerReferences"):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            loop.call_later(0.2, self.store.collect_dangling, kind, obj)

    # ---------------------------------------------------------------- HTTP
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests[request.method] += 1
        for hook in self.request_hooks:
            hook(request)
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        try:
            admin = self.admin.get((request.method, request.path))
            if admin is not None:
                return await admin(request)
            return await self._route(request)
        except errors.APIError as error:
            return web.json_response(error.status(), status=error.code)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
            return web.json_response(
                errors.bad_request(f"invalid request body: {error}").status(), status=400
            )

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if parts == ["version"]:
            return web.json_response(VERSION)
        if parts and parts[0] == "openapi":
            return web.json_response(openapi.document(self.registry, parts[1:], request.query))
        if parts == ["api"]:
            return web.json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}
                    ],
                }
            )
        if parts == ["apis"]:
            return web.json_response(self._group_list())
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts and parts[0] == "apis" and len(parts) >= 2:
            if len(parts) == 2:
                return web.json_response(self._group(parts[1]))
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise errors.not_found("path", request.path)
        if not rest:
            return web.json_response(self._resource_list(group, version))
        target = self._target(group, version, rest)
        return await self._serve(request, target)

    def _target(self, group: str, version: str, rest: list[str]) -> Target:
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in SUBRESOURCES:
            namespace, rest = rest[1], rest[2:]
        kind = self.kind(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if kind.namespaced and namespace is None and name is not None:
            raise errors.not_found("path", "/".join(rest))
        if not kind.namespaced:
            namespace = ""
        return Target(kind, namespace, name, subresource)

    async def _serve(self, request: web.Request, target: Target) -> web.StreamResponse:
        method, query = request.method, request.query
        kind = target.kind
        as_table = "as=Table" in request.headers.get("Accept", "")
        if method == "GET" and target.name is None:
            if query.get("watch") in ("1", "true"):
                return await self._watch(request, target, as_table)
            matches = _matcher(query)
            items, rv = self.store.select(kind, target.namespace, matches)
            if as_table:
                return web.json_response(tables.table(kind, items, rv))
            return web.json_response(
                {
                    "kind": f"{kind.kind}List",
                    "apiVersion": kind.api_version,
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }
            )
        namespace = target.namespace or ""
        if method == "GET":
            assert target.name is not None
            if target.subresource == "log":
                return self._log(namespace, target.name, query)
            obj = self.store.get(kind, namespace, target.name)
            if as_table:
                return web.json_response(
                    tables.table(kind, [obj], obj["metadata"]["resourceVersion"])
                )
            return web.json_response(obj)
        strict, warn = _validation_mode(query)
        dry_run = "All" in query.getall("dryRun", [])
        if method == "POST" and target.name is None:
            body = await _body(request)
            _check_body_namespace(body, namespace, kind)
            if dry_run:
                self.admission.on_create(kind, copy.deepcopy(body), strict=strict)
                return web.json_response(body, status=201)
            created, warnings = self.create(kind, namespace, body, strict=strict)
            return _respond(created, 201, warnings if warn else [])
        if target.name is None:
            if method == "DELETE":
                return await self._delete_collection(request, target)
            raise errors.APIError(405, "MethodNotAllowed", f"{method} is not allowed on a list")
        status = target.subresource == "status"
        if target.subresource not in (None, "status"):
            raise errors.not_found("subresource", str(target.subresource))
        if status and not kind.status_subresource:
            raise errors.not_found(f"{kind.plural}/status", target.name)
        if method == "PUT":
            body = await _body(request)
            if body.get("metadata", {}).get("name") not in (None, target.name):
                raise errors.bad_request(
                    "the name of the object does not match the name on the URL"
                )
            updated, warnings = self.update(
                kind, namespace, target.name, body, status=status, strict=strict
            )
            return _respond(updated, 200, warnings if warn else [])
        if method == "PATCH":
            return await self._patch(request, target, namespace, status, strict, warn)
        if method == "DELETE":
            options = await _body(request) if request.can_read_body else {}
            policy = query.get("propagationPolicy") or (options or {}).get("propagationPolicy")
            if (options or {}).get("orphanDependents") is True:
                policy = "Orphan"
            return web.json_response(self.delete(kind, namespace, target.name, policy))
        raise errors.APIError(405, "MethodNotAllowed", f"{method} is not allowed")

    async def _patch(
        self,
        request: web.Request,
        target: Target,
        namespace: str,
        status: bool,
        strict: bool,
        warn: bool,
    ) -> web.StreamResponse:
        kind, name = target.kind, target.name
        assert name is not None
        content_type = request.headers.get("Content-Type", patching.MERGE)
        raw = await request.text()
        body: Any = yaml.safe_load(raw) if "yaml" in content_type else json.loads(raw or "null")
        current = self.store.find(kind, namespace, name)
        if current is None:
            if content_type.startswith(patching.APPLY):  # server-side apply creates
                created, warnings = self.create(kind, namespace, body, strict=strict)
                return _respond(created, 201, warnings if warn else [])
            raise errors.not_found(_resource_name(kind), name)
        patched = patching.apply(content_type, current, body, builtin=kind.schema is None)
        if not isinstance(patched, dict):
            raise errors.bad_request("the patch must leave an object")
        wanted_rv = (
            (body or {}).get("metadata", {}).get("resourceVersion")
            if isinstance(body, dict)
            else None
        )
        if not wanted_rv:
            patched.setdefault("metadata", {})["resourceVersion"] = current["metadata"][
                "resourceVersion"
            ]
        updated, warnings = self.update(
            kind, namespace, name, patched, status=status, strict=strict
        )
        return _respond(updated, 200, warnings if warn else [])

    async def _delete_collection(self, request: web.Request, target: Target) -> web.StreamResponse:
        items, _ = self.store.select(target.kind, target.namespace, _matcher(request.query))
        for item in items:
            meta = item["metadata"]
            if self.store.find(target.kind, meta.get("namespace", ""), meta["name"]) is not None:
                self.delete(target.kind, meta.get("namespace", ""), meta["name"])
        return web.json_response(
            {
                "kind": f"{target.kind.kind}List",
                "apiVersion": target.kind.api_version,
                "metadata": {},
                "items": items,
            }
        )

    def _log(self, namespace: str, name: str, query: Any) -> web.StreamResponse:
        """A pod's log: ``tailLines``, ``sinceSeconds`` and ``limitBytes`` as the kubelet
        applies them (lines are not timestamped here: ``sinceSeconds`` gives nothing when the
        log was not written in that time, else what the other two select)."""
        self.store.get(self.registry.kinds[("", "v1", "pods")], namespace, name)
        since = query.get("sinceSeconds")
        if since is not None and since.isdigit() and self.log_age is not None:
            age = self.log_age(namespace, name)
            if age is None or age > int(since):
                return web.Response(text="", content_type="text/plain")
        text = (self.log_source(namespace, name) if self.log_source else None) or ""
        tail = query.get("tailLines")
        if tail is not None and tail.isdigit():
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail) :]) if int(tail) else ""
        limit = query.get("limitBytes")
        if limit is not None and limit.isdigit():
            text = text.encode()[: int(limit)].decode(errors="ignore")
        return web.Response(text=text, content_type="text/plain")

    # ---------------------------------------------------------------- watch
    async def _watch(
        self, request: web.Request, target: Target, as_table: bool
    ) -> web.StreamResponse:
        kind, query = target.kind, request.query
        matches = _matcher(query)
        watch = Watch(kind.key, target.namespace)
        rv = query.get("resourceVersion", "")
        initial: list[tuple[str, Obj]] = []
        error: errors.APIError | None = None
        if rv in ("", "0"):
            items, _ = self.store.select(kind, target.namespace, matches)
            initial = [("ADDED", item) for item in items]
            self.store.subscribe(watch)
        else:
            try:
                backlog = self.store.events_since(int(rv), watch)
            except errors.APIError as gone:
                error = gone
            except ValueError:
                error = errors.bad_request(f"invalid resourceVersion {rv!r}")
            else:
                self.store.subscribe(watch)
                initial = [pair for e in backlog if (pair := _translate(e, matches))]
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            if error is not None:
                await _send(response, {"type": "ERROR", "object": error.status()})
                return response
            for type_, obj in initial:
                await _send(response, self._event(kind, type_, obj, as_table))
            if query.get("sendInitialEvents") == "true":  # WatchList: mark the end of the state
                await _send(response, self._bookmark(kind, initial_events_end=True))
            await self._follow(response, watch, kind, matches, query, as_table)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unsubscribe(watch)
        return response

    async def _follow(
        self,
        response: web.StreamResponse,
        watch: Watch,
        kind: Kind,
        matches: Any,
        query: Any,
        as_table: bool,
    ) -> None:
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait = min(left, self.bookmark_interval) if bookmarks else left
            # What is queued already goes out at once, in one write: waiting for each event
            # (wait_for makes a task and a timer) took a turn of the loop per event, and under
            # load (a burst of creations) a watch fell seconds behind its store.
            events = _queued(watch.queue)
            if not events:
                try:
                    events = [await asyncio.wait_for(watch.queue.get(), wait)]
                except TimeoutError:
                    if bookmarks and time.monotonic() < deadline:
                        await _send(response, self._bookmark(kind))
                    continue
                events += _queued(watch.queue)
            lines, closed = [], False
            for event in events:
                if event is None:  # closed by fault injection: what came before still goes
                    closed = True
                    break
                pair = _translate(event, matches)
                if pair is not None:
                    lines.append(_line(self._event(kind, pair[0], pair[1], as_table)))
            if lines:
                await response.write(b"".join(lines))
            if closed:
                return

    def _event(self, kind: Kind, type_: str, obj: Obj, as_table: bool) -> dict[str, Any]:
        view = {**obj, "apiVersion": kind.api_version, "kind": kind.kind}
        if as_table:
            return {
                "type": type_,
                "object": tables.table(kind, [view], view["metadata"]["resourceVersion"]),
            }
        return {"type": type_, "object": view}

    def _bookmark(self, kind: Kind, *, initial_events_end: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {"resourceVersion": str(self.store.revision)}
        if initial_events_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {
            "type": "BOOKMARK",
            "object": {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": metadata},
        }

    # ---------------------------------------------------------------- discovery
    def _group_entry(self, group: str, versions: list[str]) -> dict[str, Any]:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _group_list(self) -> dict[str, Any]:
        groups = sorted(
            ((g, v) for g, v in self.registry.groups().items() if g),
            key=lambda item: (-GROUP_PRIORITY.get(item[0], 0), item[0]),
        )
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [self._group_entry(g, v) for g, v in groups],
        }

    def _group(self, group: str) -> dict[str, Any]:
        versions = self.registry.groups().get(group)
        if not versions:
            raise errors.not_found("group", group)
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_entry(group, versions)}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        kinds = self.registry.in_group_version(group, version)
        if not kinds:
            raise errors.not_found("groupVersion", f"{group}/{version}")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [entry for kind in kinds for entry in kind.resource_entries()],
        }


def _translate(event: Event, matches: Any) -> tuple[str, Obj] | None:
    """The event a selective watch sees: objects entering or leaving the selection too."""
    new_in = matches(event.obj)
    if event.type == "ADDED":
        return ("ADDED", event.obj) if new_in else None
    if event.type == "DELETED":
        return ("DELETED", event.obj) if (event.old is None or matches(event.old)) else None
    old_in = event.old is not None and matches(event.old)
    if new_in and old_in:
        return ("MODIFIED", event.obj)
    if new_in:
        return ("ADDED", event.obj)
    if old_in:
        return ("DELETED", event.obj)
    return None


def _matcher(query: Any) -> Any:
    labels = label_matcher(query.get("labelSelector"))
    fields = field_matcher(query.get("fieldSelector"))
    return lambda obj: labels(obj) and fields(obj)


def _validation_mode(query: Any) -> tuple[bool, bool]:
    mode = query.get("fieldValidation", "Warn")
    return mode == "Strict", mode == "Warn"


PROTOBUF = "application/vnd.kubernetes.protobuf"


async def _body(request: web.Request) -> Any:
    if request.headers.get("Content-Type", "").startswith(PROTOBUF):
        raise errors.APIError(
            415,
            "UnsupportedMediaType",
            "the relora sandbox speaks JSON only, not protobuf: use `kubectl apply -f` or "
            "`kubectl create -f` with a manifest instead of typed `kubectl create <kind>`",
        )
    raw = await request.text()
    if not raw.strip():
        return {}
    content_type = request.headers.get("Content-Type", "")
    body = yaml.safe_load(raw) if "yaml" in content_type else json.loads(raw)
    if not isinstance(body, dict):
        raise errors.bad_request("the request body must be an object")
    return body


def _check_body_namespace(body: Obj, namespace: str, kind: Kind) -> None:
    given = body.get("metadata", {}).get("namespace")
    if kind.namespaced and given and given != namespace:
        raise errors.bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
        )


def _respond(obj: Obj, code: int, warnings: list[str]) -> web.StreamResponse:
    """A JSON response with one Warning header per warning (as kubectl prints them)."""
    response = web.json_response(obj, status=code)
    for warning in warnings:
        escaped = warning.replace('"', '\\"')
        response.headers.add("Warning", f'299 - "{escaped}"')
    return response


def _resource_name(kind: Kind) -> str:
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(_line(event))


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode() + b"\n"


def _queued(queue: asyncio.Queue[T]) -> list[T]:
    """Everything ``queue`` holds now, without waiting."""
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
