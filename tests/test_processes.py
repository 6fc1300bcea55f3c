"""relora_sandbox.processes: the ports handed to child servers and the wait for a liveness
probe (an operator told the same port for its metrics and its liveness died at start-up while
its metrics server answered the probe: a test then waited a minute for nothing)."""

from __future__ import annotations

import http.server
import os
import sys
import threading
from pathlib import Path

import pytest

from relora_sandbox import processes


def test_no_port_is_handed_out_twice() -> None:
    ports = [processes.free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)


class _Metrics(http.server.BaseHTTPRequestHandler):
    """A server that answers every path with text, as prometheus_client's does."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"# HELP up\nup 1\n")

    def log_message(self, format: str, *args: object) -> None:
        return


def test_another_server_on_the_liveness_port_is_not_taken_for_the_process(tmp_path: Path) -> None:
    port = processes.free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="not live after 1 s"):
            processes.start_live(
                [sys.executable, "-c", "import time; time.sleep(30)"],
                env=os.environ,
                log=tmp_path / "log",
                liveness_port=port,
                timeout=1.0,
            )
    finally:
        server.shutdown()
        server.server_close()
