"""Operator settings, from environment variables (the Helm chart sets them).

| variable | default | meaning |
| --- | --- | --- |
| RELORA_TRAINER_IMAGE | ghcr.io/relora-dev/relora-trainer:0.1.0 | image of the trainer Jobs |
| RELORA_TRAINER_COMMAND | ["python", "-m", "relora_trainer.job"] | JSON list: its command |
| RELORA_RESYNC_SECONDS | 10 | progress read this often at most per running pod; 30x: relist |
| RELORA_METRICS_PORT | 8080 | Prometheus metrics (0: off) |
| RELORA_LOG_TAIL_LINES | 50 | log lines read per running pod for live progress |
| RELORA_CLUSTER_SCANNING | true | let Kopf watch CRDs (and namespaces unless it watches all) |

RELORA_RESYNC_SECONDS sets two periods: ``progress_seconds`` (itself: a running pod's log is
read at most this often, less often when many pods run) and ``relist_seconds`` (30 times it: each
namespace with migrations is listed again, to find what was deleted while no watch said so).

With RELORA_CLUSTER_SCANNING=false the operator needs no cluster-scoped permission: it serves
the resources found at start-up in the namespaces named on its command line (a CRD created
later is served after a restart). The Helm chart sets it to false in single-namespace mode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from pydantic import BaseModel, Field, ValidationError

DEFAULT_IMAGE = "ghcr.io/relora-dev/relora-trainer:0.1.0"

ENV: dict[str, str] = {
    "trainer_image": "RELORA_TRAINER_IMAGE",
    "trainer_command": "RELORA_TRAINER_COMMAND",
    "resync_seconds": "RELORA_RESYNC_SECONDS",
    "metrics_port": "RELORA_METRICS_PORT",
    "log_tail_lines": "RELORA_LOG_TAIL_LINES",
    "cluster_scanning": "RELORA_CLUSTER_SCANNING",
}
"""Settings field -> the environment variable that sets it (the chart sets each one)."""


class Settings(BaseModel):
    trainer_image: str = DEFAULT_IMAGE
    trainer_command: list[str] = Field(
        default_factory=lambda: ["python", "-m", "relora_trainer.job"]
    )
    resync_seconds: float = Field(default=10.0, gt=0)
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    log_tail_lines: int = Field(default=50, ge=1, le=10_000)
    cluster_scanning: bool = True

    @property
    def progress_seconds(self) -> float:
        return self.resync_seconds

    @property
    def relist_seconds(self) -> float:
        return 30 * self.resync_seconds

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read RELORA_* variables; raise ValueError naming the variable on bad values."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field, variable in ENV.items():
            if variable not in env:
                continue
            raw = env[variable]
            if field == "trainer_command":
                try:
                    values[field] = json.loads(raw)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{variable}: not a JSON list of strings ({error})") from error
            else:
                values[field] = raw
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            variable = ENV[str(first["loc"][0])]
            raise ValueError(f"{variable}: {first['msg']}") from error
