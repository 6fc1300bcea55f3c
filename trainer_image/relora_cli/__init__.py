"""The `relora` command line: validate, plan and run manifests, print the CRD, start the
sandbox, build testbeds and benchmark. The top layer: each command imports its package
(relora_trainer, relora_sandbox, relora_operator, relora_lab) only when it runs.

Exit codes (see relora_trainer.errors): 0 success; 1 internal error; 2 usage error or unreadable
file; 3 invalid input (manifest, data, models, adapter); 4 not ready within the budget.
The ML stack is imported only by the commands that need it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from relora_api import __version__, crd, manifests, resource, uris, validation
from relora_trainer.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE, refuse


def _cmd_validate(args: argparse.Namespace) -> int:
    invalid = False
    checked = 0
    for path in args.filename:
        try:
            documents = manifests.read_documents(path)
        except manifests.ManifestError as error:
            return refuse(error)
        for document in documents:
            content = document.content
            if (
                isinstance(content, dict)
                and content.get("kind") != resource.KIND
                and not str(content.get("apiVersion", "")).startswith(f"{resource.GROUP}/")
            ):
                print(f"{document.label}: skipped {content.get('kind', 'object')} (not ours)")
                continue
            checked += 1
            migration, problems = validation.validate_manifest(content)
            if migration is None:
                invalid = True
                for problem in problems:
                    print(f"{document.label}: {problem}", file=sys.stderr)
                continue
            refused = _adapter_problems(migration, path)
            if refused:
                invalid = True
                for line in refused:
                    print(f"{document.label}: {line}", file=sys.stderr)
                continue
            count = len(migration.spec.adapters)
            print(
                f"{document.label}: valid {resource.KIND} '{migration.metadata.name}' "
                f"({count} adapter{'s' if count != 1 else ''}, "
                f"strategy {migration.spec.method.strategy})"
            )
    if checked == 0:
        print(f"error: no {resource.KIND} found in {', '.join(args.filename)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT if invalid else EXIT_OK


def _adapter_problems(migration: resource.AdapterMigration, path: str) -> list[str]:
    """The old adapters this machine can read (paths and volumes, resolved like ``relora run``
    does) whose config says they cannot be migrated; the others are checked by the trainer."""
    from relora_trainer import adapter_config
    from relora_trainer.errors import BadInput
    from relora_trainer.storage import Storage

    storage = Storage.for_manifest(path)
    problems = []
    for adapter in migration.spec.adapters:
        where = f"spec.adapters[{adapter.name}].uri"
        if uris.parse_uri(adapter.uri).scheme not in ("path", "pvc"):
            continue  # fetched by the trainer
        try:
            config = storage.local_path(adapter.uri, what=where) / adapter_config.CONFIG_FILE
            if config.is_file():
                adapter_config.read_config(config, what=where)
        except BadInput as error:
            problems.append(str(error))
    return problems


def _cmd_plan(args: argparse.Namespace) -> int:
    from relora_trainer import plan

    return plan.run(
        args.filename, device=args.device, sequence=args.seq_len, completion=args.completion_len
    )


def _cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd.render_yaml())
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        from relora_trainer import local_run
    except ImportError as error:
        print(
            f"error: relora run needs the trainer extra ({error.name} is missing): "
            "pip install 'relora-operator[trainer]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return local_run.run(
        args.filename, only=args.adapter, device=args.device, quiet=args.quiet, debug=args.debug
    )


def _cmd_testbed_toy(args: argparse.Namespace) -> int:
    try:
        from relora_lab import toyworld
        from relora_trainer import local_run
    except ImportError as error:
        print(f"error: needs the trainer extra ({error.name} is missing)", file=sys.stderr)
        return EXIT_USAGE
    local_run.quiet_libraries()
    paths = toyworld.build(Path(args.out), seed=args.seed)
    print(f"toy world written to {paths.root}: models/v1, models/v2-mild, adapters/, data/")
    return EXIT_OK


def _cmd_sandbox(args: argparse.Namespace) -> int:
    try:
        from relora_sandbox import sandbox
    except ImportError as error:
        print(f"error: needs the sandbox extra ({error.name} is missing)", file=sys.stderr)
        return EXIT_USAGE
    images: dict[str, list[str]] = {}
    for mapping in args.image or []:
        image, _, command = mapping.partition("=")
        if not image or not command:
            print(f"error: --image {mapping!r}: expected IMAGE=COMMAND", file=sys.stderr)
            return EXIT_USAGE
        images[image] = shlex.split(command)
    from relora_operator import seals

    box = sandbox.Sandbox(Path(args.workdir), port=args.port, image_commands=images)
    companions = []
    if not args.no_operator:
        # The operator, with trainer pods run by this Python (the sandbox has no images).
        trainer = json.dumps([sys.executable, "-m", "relora_trainer.job"])
        env = {
            "RELORA_TRAINER_COMMAND": trainer,
            "RELORA_RESYNC_SECONDS": "2",
            "RELORA_METRICS_PORT": str(args.metrics_port),
            seals.KEY_ENV: _sandbox_seal_key(Path(args.workdir)),
        }
        argv = [
            sys.executable,
            "-m",
            "relora_operator",
            "--all-namespaces",
            f"--liveness=http://127.0.0.1:{args.liveness_port}/healthz",
            "--quiet",
        ]
        companions.append(("operator", argv, env))
    asyncio.run(
        sandbox.serve(box, ready=lambda text: print(text, flush=True), companions=companions)
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relora",
        description="Migrate LoRA adapters to an updated base model (ReLoRA).",
    )
    parser.add_argument("--version", action="version", version=f"relora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "validate",
        help="check AdapterMigration manifests (schema and semantics)",
        description="Check manifests; print one line per problem, naming the field.",
    )
    check.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE",
        help="manifest file (repeatable; '-' reads standard input)",
    )
    check.set_defaults(handler=_cmd_validate)

    run = commands.add_parser(
        "run",
        help="migrate the adapters of a manifest on this machine",
        description=(
            "Run an AdapterMigration locally (CPU, or CUDA with bf16 when present). Relative "
            "paths resolve against the manifest's folder. Exit 0 when every adapter is ready, "
            "4 when one is not ready within its budget, 3 on invalid input."
        ),
    )
    run.add_argument("-f", "--filename", required=True, metavar="FILE", help="the manifest")
    run.add_argument(
        "--adapter", action="append", metavar="NAME", help="only this adapter (repeatable)"
    )
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--debug", action="store_true", help="print tracebacks of internal errors")
    run.set_defaults(handler=_cmd_run)

    planning = commands.add_parser(
        "plan",
        help="estimate each adapter's peak memory and the smallest GPU that holds it",
        description=(
            "From the models' config.json and safetensors headers (no weight is read), the old "
            "adapter's config and the training data: per adapter the parameters, the memory of "
            "the weights, LoRA + AdamW and activations, the peak, and the smallest common GPU "
            "(24/40/48/80/141 GiB) with and without gradient checkpointing; on cuda, the GPUs "
            "it recommends per worker (spec.distributed: each worker holds a whole replica and "
            "only the activations shrink with its share of each batch, unless shardBase: then "
            "each holds its share of the weights)."
        ),
    )
    planning.add_argument("-f", "--filename", required=True, metavar="FILE", help="the manifest")
    planning.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    planning.add_argument(
        "--seq-len", type=int, metavar="N", help="tokens per example (default: the data's longest)"
    )
    planning.add_argument(
        "--completion-len",
        type=int,
        metavar="N",
        help="completion tokens per example, the ones that get logits (default: the data's "
        "longest; with --seq-len, all of them)",
    )
    planning.set_defaults(handler=_cmd_plan)

    testbed = commands.add_parser("testbed", help="build model pairs to try migrations on")
    kinds = testbed.add_subparsers(dest="kind", required=True, metavar="KIND")
    toy = kinds.add_parser(
        "toy",
        help="a tiny synthetic world in seconds (smoke tests, the quick demo)",
        description=(
            "Write two tiny random Llama models (v1, and v2 = v1 perturbed), a LoRA adapter "
            "trained on v1 and a 4-class task as JSONL, in the layout the examples expect."
        ),
    )
    toy.add_argument("--out", required=True, metavar="DIR", help="where to write it")
    toy.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    toy.set_defaults(handler=_cmd_testbed_toy)
    from relora_lab.bench import commands as bench_commands
    from relora_lab.testbed import commands as testbed_commands

    testbed_commands.register_build(kinds)
    bench_commands.register(commands)

    box = commands.add_parser(
        "sandbox",
        help="a local Kubernetes API emulator + Job runner for kubectl (no cluster needed)",
        description=(
            "Serve a Kubernetes API emulator on 127.0.0.1 and run Jobs' pods as local "
            "processes; write a kubeconfig for kubectl. Stops cleanly on Ctrl-C."
        ),
    )
    box.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    box.add_argument(
        "--workdir", default=".relora/sandbox", help="kubeconfig, pod logs, PVC folders"
    )
    box.add_argument(
        "--image",
        action="append",
        metavar="IMAGE=COMMAND",
        help="run containers of IMAGE that set no command with COMMAND (repeatable)",
    )
    box.add_argument(
        "--no-operator", action="store_true", help="serve the API only, without the operator"
    )
    box.add_argument("--metrics-port", type=int, default=8080, help="operator metrics port")
    box.add_argument("--liveness-port", type=int, default=8081, help="operator liveness port")
    box.set_defaults(handler=_cmd_sandbox)

    show = commands.add_parser("crd", help="print the AdapterMigration CRD (YAML)")
    show.set_defaults(handler=_cmd_crd)
    return parser


def _sandbox_seal_key(workdir: Path) -> str:
    """The operator's seal key for this sandbox, kept in its folder (a restart keeps it)."""
    path = workdir / "seal-key"
    if not path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code
