"""`relora-operator` / `python -m relora_operator`: run the Kopf operator.

Defaults: standalone (one replica, no peering), liveness probe on :8081/healthz. Extra
arguments go to `kopf run`, e.g. `--all-namespaces` or `--namespace team-a`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

LIVENESS = "http://0.0.0.0:8081/healthz"


def main(argv: Sequence[str] | None = None) -> None:
    from kopf import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--liveness") for a in args):
        args.append(f"--liveness={LIVENESS}")
    cli.main(["run", "--standalone", "-m", "relora_operator.handlers", *args])


if __name__ == "__main__":
    main()
