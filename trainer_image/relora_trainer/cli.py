"""The `relora` command line: validate manifests, print the CRD (later: run, bench, sandbox).

Exit codes: 0 success; 1 the input is invalid; 2 usage error or unreadable file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from relora_operator import __version__, crd, manifests, validation
from relora_operator.api import resource

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def _cmd_validate(args: argparse.Namespace) -> int:
    invalid = False
    checked = 0
    for path in args.filename:
        try:
            documents = manifests.read_documents(path)
        except manifests.ManifestError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USAGE
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
            count = len(migration.spec.adapters)
            print(
                f"{document.label}: valid {resource.KIND} '{migration.metadata.name}' "
                f"({count} adapter{'s' if count != 1 else ''}, "
                f"strategy {migration.spec.method.strategy})"
            )
    if checked == 0:
        print(f"error: no {resource.KIND} found in {', '.join(args.filename)}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_INVALID if invalid else EXIT_OK


def _cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd.render_yaml())
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

    show = commands.add_parser("crd", help="print the AdapterMigration CRD (YAML)")
    show.set_defaults(handler=_cmd_crd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
