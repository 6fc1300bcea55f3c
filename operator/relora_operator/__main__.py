"""`relora-operator` / `python -m relora_operator`: run the Kopf operator.

Defaults: liveness probe on :8081/healthz; Kopf standalone (no Kopf peering): with
RELORA_LEASE_NAMESPACE set, replicas elect a leader on a Lease first (relora_operator.leadership)
and only the leader runs Kopf. Extra arguments go to `kopf run`, e.g. `--all-namespaces` or
`--namespace team-a`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

LIVENESS = "http://0.0.0.0:8081/healthz"


def main(argv: Sequence[str] | None = None) -> None:
    from kopf import cli

    from relora_operator import leadership
    from relora_operator.kube import Kube

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--liveness") for a in args):
        args.append(f"--liveness={LIVENESS}")
    liveness = next(a for a in args if a.startswith("--liveness")).split("=", 1)[1]
    config = leadership.LeaseConfig.from_env()
    elector = None
    if config is not None:
        # Kopf configures logging only when it starts: say meanwhile what the election does.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        leadership.LOG.addHandler(handler)
        leadership.LOG.setLevel(logging.INFO)
        try:
            elector = leadership.lead(config, Kube.connect().api, liveness)
        finally:
            leadership.LOG.removeHandler(handler)
    try:
        cli.main(["run", "--standalone", "-m", "relora_operator.handlers", *args])
    finally:
        if elector is not None:
            elector.release()


if __name__ == "__main__":
    main()
