"""Assemble the sandbox (the emulator, the Job runner, the routes of relora_sandbox.routes) and
run it on 127.0.0.1, in this loop or in a background thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from relora_sandbox.jobs import JobRunner
from relora_sandbox.routes import register_routes
from relora_sandbox.server import Emulator


def kubeconfig(url: str, *, context: str = "relora-sandbox") -> dict[str, Any]:
    """A kubeconfig pointing at ``url`` (plain HTTP on loopback, no credentials)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": url}}],
        "users": [{"name": context, "user": {}}],
        "contexts": [
            {
                "name": context,
                "context": {"cluster": context, "user": context, "namespace": "default"},
            }
        ],
        "current-context": context,
        "preferences": {},
    }


class Sandbox:
    """Emulator + Job runner served on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 5.0,
        image_commands: dict[str, list[str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.host, self.port = host, port
        self.emulator = Emulator(bookmark_interval=bookmark_interval)
        self.jobs = JobRunner(self.emulator, workdir, image_commands=image_commands or {})
        self._runner: web.AppRunner | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        register_routes(self)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "kubeconfig"

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self._listen()
        self.jobs.kubelet.api_port = self.port
        self.kubeconfig_path.write_text(yaml.safe_dump(kubeconfig(self.url), sort_keys=False))
        self.jobs.start()

    async def _listen(self) -> None:
        self._runner = web.AppRunner(self.emulator.app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def _close(self) -> None:
        self.emulator.store.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self, *, down_seconds: float = 1.0) -> None:
        """Fault injection: an API server restart. Every connection and watch is dropped, the
        port refuses connections for ``down_seconds``, then the same store is served again on
        the same port (as etcd keeps the objects behind a restarted kube-apiserver). The Job
        runner and its pod processes go on meanwhile, as kubelets do."""
        await self._close()
        await asyncio.sleep(down_seconds)
        await self._listen()

    def restart_soon(self, down_seconds: float) -> None:
        """``restart()`` in the background, once the request that asks for it is answered."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._restart_soon(down_seconds))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart_soon(self, down_seconds: float) -> None:
        await asyncio.sleep(0.1)  # let the answer go out first
        await self.restart(down_seconds=down_seconds)

    async def stop(self) -> None:
        for task in list(self._restarts):
            await task
        await self.jobs.stop()
        await self._close()


class SandboxThread:
    """A Sandbox on its own event loop in a daemon thread: for tests and synchronous callers."""

    def __init__(self, workdir: Path, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.sandbox = Sandbox(workdir, **options)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Sandbox:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sandbox.start(), self.loop).result(timeout=30)
        return self.sandbox

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.sandbox.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def run(self, coroutine: Any, *, timeout: float = 60.0) -> Any:
        """Run ``coroutine`` on the sandbox's loop and return its result (e.g. ``restart()``)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)

    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` on the sandbox's loop (where the store lives) and return its result."""

        async def invoke() -> Any:
            return function(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(invoke(), self.loop).result(timeout=30)


def usage(sandbox: Sandbox) -> str:
    """What `relora sandbox` prints once it listens."""
    return "\n".join(
        [
            f"relora sandbox: Kubernetes API emulator on {sandbox.url}",
            f"  kubeconfig: {sandbox.kubeconfig_path}",
            f"  pods run as local processes; PVC claims are folders under {sandbox.jobs.pvc_root}",
            "",
            f"  export KUBECONFIG={sandbox.kubeconfig_path}",
            "  kubectl apply -f crds/",
            "  kubectl get adaptermigrations -w",
            "",
            "Ctrl-C stops it and every pod process it started.",
        ]
    )


async def serve(
    sandbox: Sandbox,
    *,
    ready: Any = print,
    companions: list[tuple[str, list[str], dict[str, str]]] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly (no process left behind).

    ``companions`` are commands (name, argv, extra env) started once the API listens, with
    KUBECONFIG pointing at it (e.g. the operator), logging to ``<workdir>/<name>.log``, and
    terminated on the way out.
    """
    import os
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await sandbox.start()
    processes = []
    for name, argv, extra in companions or []:
        env = {**os.environ, **extra, "KUBECONFIG": str(sandbox.kubeconfig_path)}
        log = (sandbox.workdir / f"{name}.log").open("ab")
        processes.append(
            await asyncio.create_subprocess_exec(*argv, env=env, stdout=log, stderr=log)
        )
    ready(usage(sandbox))
    try:
        await stop.wait()
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
        await sandbox.stop()
