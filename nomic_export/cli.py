"""The ``nomic-export`` command line: thin argparse subcommands, each calling one function.

Heavy modules (torch, onnxruntime) are imported inside each command, so ``--help`` is instant and
``embed`` never imports torch. A ``UserError`` prints its message and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

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


def _gates(args: argparse.Namespace):
    from nomic_export.exporter.gates import GATE_FIELDS, Gates

    return Gates(**{f.name: getattr(args, f.name) for f in GATE_FIELDS})


def _cmd_export(args: argparse.Namespace) -> None:
    from nomic_export.exporter.export import export

    export(
        args.model,
        args.output,
        revision=args.revision,
        variants=args.variants,
        opset=args.opset,
        overwrite=args.overwrite,
        gates=_gates(args),
        push_to_hub=args.push_to_hub,
        private=args.private,
        token=args.token,
    )
    print(args.output)


def _cmd_verify(args: argparse.Namespace) -> None:
    from nomic_export.exporter.export import verify_export
    from nomic_export.exporter.verify import format_table

    print(format_table(verify_export(args.out, reference=args.reference, gates=_gates(args))))


def _cmd_embed(args: argparse.Namespace) -> None:
    import json

    from nomic_export.runtime import EmbedStats, MoETextEmbedding

    texts = list(args.texts)
    if args.file:
        try:
            handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
            with handle:
                texts += [line.rstrip("\n") for line in handle]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--file {args.file!r}: {err}; give a UTF-8 text file, one text per line") from err
    model = MoETextEmbedding(args.out, variant=args.variant, threads=args.threads)
    stats = EmbedStats()
    try:
        for text, vector in zip(texts, model.embed(texts, batch_size=args.batch_size, task=args.task, dim=args.dim, stats=stats)):
            print(json.dumps({"text": text, "embedding": vector.tolist()}, ensure_ascii=False))
    except ValueError as err:  # a bad --dim or --batch-size, named by the runtime
        raise UserError(str(err)) from err
    if stats.truncated:
        logging.getLogger("nomic_export").warning("embed: %d text(s) cut to 512 tokens, at positions (0-based) %s", stats.truncated, stats.truncated_indices)


def _cmd_publish(args: argparse.Namespace) -> None:
    from nomic_export.exporter.publish import format_plan, publish

    result = publish(
        args.out,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
        dry_run=args.dry_run,
        allow_unverified=args.allow_unverified,
    )
    print(format_plan(result, args.out) if args.dry_run else result["commit_url"])


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def _cmd_bench(args: argparse.Namespace) -> None:
    from nomic_export.exporter.bench import bench, format_tables

    results = bench(
        args.out,
        batches=args.batch,
        seqs=args.seq,
        threads=args.threads,
        torch_reference=args.torch_reference,
        rounds=args.rounds,
        json_path=args.json,
        plot_path=args.plot,
    )
    print(format_tables(results))


COMMANDS = {
    "bench": _cmd_bench,
    "export": _cmd_export,
    "publish": _cmd_publish,
    "verify": _cmd_verify,
    "init-random": _cmd_init_random,
    "build-ops": _cmd_build_ops,
    "embed": _cmd_embed,
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

    p = sub.add_parser("export", help="export a checkpoint to ONNX and verify it against the PyTorch reference")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"Hub id or local directory (default {DEFAULT_MODEL})")
    p.add_argument("-o", "--output", required=True, help="the export directory to create")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--variants", default="moe", help="comma-separated: moe (custom op), ortmoe, dense (default moe)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME", help="publish OUT to this Hub repository once it is verified")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("--token", help="with --push-to-hub: Hub token (default: HF_TOKEN or `hf auth login`'s)")
    _add_gate_flags(p)

    p = sub.add_parser("verify", help="verify every variant in an export directory against the PyTorch reference")
    p.add_argument("out", help="an export directory")
    p.add_argument("--reference", help="checkpoint to compare with (default: the source in export_report.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but the table and errors")
    _add_gate_flags(p)

    p = sub.add_parser("embed", help="embed texts with an export directory (torch-free); one JSON line per text")
    p.add_argument("out", help="an export directory, or a Hub id")
    p.add_argument("texts", nargs="*", help="texts to embed (as given: no prefix unless --task)")
    p.add_argument("--file", help="also embed each line of this file ('-' for stdin)")
    p.add_argument("--task", choices=("search_query", "search_document", "classification", "clustering"), help="prepend Nomic's task prefix")
    p.add_argument("--dim", type=int, help="Matryoshka size, 64 to 768 (default: the full hidden size)")
    p.add_argument("--variant", default="moe", help="moe (default), ortmoe or dense")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: one per core)")

    p = sub.add_parser("publish", help="upload a verified export directory to the Hugging Face Hub in one commit")
    p.add_argument("out", help="an export directory")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="the Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created if missing (default main)")
    p.add_argument("--commit-message", help="default: Upload ONNX export (nomic-export VERSION)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or `hf auth login`'s); never printed")
    p.add_argument("--dry-run", action="store_true", help="print every file and its size; no network")
    p.add_argument("--allow-unverified", action="store_true", help="publish even if a variant failed verification")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but the result and errors")

    p = sub.add_parser("bench", help="measure every variant (and the PyTorch reference) side by side")
    p.add_argument("out", help="an export directory")
    p.add_argument("--batch", type=_ints, default=(1, 8, 32), help="batch sizes (default 1,8,32)")
    p.add_argument("--seq", type=_ints, default=(16, 128, 512), help="sequence lengths (default 16,128,512)")
    p.add_argument("--threads", type=_ints, default=(1, 2), help="intra-op thread counts (default 1,2)")
    p.add_argument("--torch-reference", metavar="MODEL", help="checkpoint for the PyTorch reference contender")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per case (default 5)")
    p.add_argument("--json", metavar="F", help="write the results as JSON")
    p.add_argument("--plot", metavar="F.png", help="draw tokens/s per batch shape (needs matplotlib)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but the tables and errors")

    return parser


def _add_gate_flags(p: argparse.ArgumentParser) -> None:
    from nomic_export.exporter.gates import GATE_FIELDS

    for f in GATE_FIELDS:
        p.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default, help=f"{f.metadata['help']} (default {f.default})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse fills embed's [texts ...] only up to the first option, so in `embed OUT --task T "text"` the
        # text arrives here; anything that looks like an option is still an error.
        if args.command != "embed" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.texts += extra
    # Our own progress lines at INFO; other libraries' chatter (torch.onnx, onnxscript) only when it is an error.
    logging.basicConfig(level=logging.ERROR, format="%(message)s", stream=sys.stderr)
    # -q hides progress (INFO); warnings stay, e.g. publishing an unverified export.
    logging.getLogger("nomic_export").setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="torch")
    warnings.filterwarnings("ignore", module="onnxscript")
    try:
        COMMANDS[args.command](args)
    except UserError as err:
        print(f"nomic-export {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a path that cannot be read or written: under a file, no permission, disk full
        print(f"nomic-export {args.command}: error: {err}; check the path and its permissions", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nomic-export {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
