"""The ``nomic-export`` command line: thin argparse subcommands, each calling one function.

Heavy modules (torch, onnxruntime) are imported inside each command, so ``--help`` is instant and
``embed`` never imports torch. A ``UserError`` prints its message and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from nomic_export import __version__
from nomic_export.errors import UserError

DEFAULT_MODEL = "nomic-ai/nomic-embed-text-v2-moe"


def _cmd_init_random(args: argparse.Namespace) -> None:
    from nomic_export.exporter.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(args.dir, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    print(path)


def _cmd_build_ops(args: argparse.Namespace) -> None:
    from nomic_export.custom_ops import build

    print(build(verbose=args.verbose, force=args.force))


COMMANDS = {
    "init-random": _cmd_init_random,
    "build-ops": _cmd_build_ops,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nomic-export", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"nomic-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init-random", help="write a random checkpoint in the real format (for tests, benchmarks)")
    p.add_argument("dir", help="directory to create")
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")

    p = sub.add_parser("build-ops", help="build the com.nomic::MoE op library; prints its path last")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached library is current")
    p.add_argument("--verbose", action="store_true")

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if getattr(args, "quiet", False) else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        COMMANDS[args.command](args)
    except UserError as err:
        print(f"nomic-export {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
