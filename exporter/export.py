"""``nomic-export export``: checkpoint in, verified and self-contained OUT directory out.

OUT is written into a temporary directory beside it and renamed at the very end, so a failed or
interrupted export leaves no OUT (and an existing OUT untouched unless the new one is complete).
The layout is ``nomic_export/layout.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from nomic_export import __version__
from nomic_export.errors import UserError, VerificationError
from nomic_export.exporter.gates import Gates
from nomic_export.exporter.checkpoint import load_model, resolve_checkpoint
from nomic_export.exporter.model_card import render_model_card
from nomic_export.exporter.verify import format_table, verify
from nomic_export.layout import (
    CUSTOM_OPS_DIR,
    DEFAULT_VARIANTS,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    ONNX_DIR,
    REPORT_NAME,
    SENTENCE_TRANSFORMERS_FILES,
    TOKENIZER_FILES,
    VARIANTS,
    platform_tag,
    variant_onnx_path,
    write_text_atomic,
)

log = logging.getLogger(__name__)


def parse_variants(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(f"--variants {text!r}: unknown {unknown!r}; choose from {','.join(VARIANTS)}, comma-separated.")
    return tuple(dict.fromkeys(names))


def export(
    model: str,
    out: str | Path,
    revision: str | None = None,
    variants: tuple[str, ...] = DEFAULT_VARIANTS,
    opset: int | None = None,
    overwrite: bool = False,
    gates: Gates = Gates(),
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> dict:
    """Export a checkpoint to ``out``, verify every variant, and return the export report.

    Args:
        model: a Hub id (e.g. ``nomic-ai/nomic-embed-text-v2-moe``) or a local checkpoint directory.
        out: the directory to create.
        revision: a Hub revision.
        variants: any of ``moe``, ``ortmoe``, ``dense``.
        opset: the ONNX opset (default ``graphs.DEFAULT_OPSET``).
        overwrite: replace an existing ``out``.
        gates: verification pass marks; a miss fails the export and keeps no OUT.
        push_to_hub: ``OWNER/NAME``: publish OUT there once it is written and verified.
        private: create the ``push_to_hub`` repository private.
        token: the Hub token for ``push_to_hub``; default the one huggingface_hub finds.
    Returns:
        The report written to ``out/export_report.json``.
    Example:
        >>> export("nomic-ai/nomic-embed-text-v2-moe", "out", variants=("moe", "ortmoe"))
    """
    from nomic_export.exporter import graphs

    started = time.monotonic()
    out = Path(out)
    variants = parse_variants(variants)
    opset = opset or graphs.DEFAULT_OPSET
    if opset < graphs.DEFAULT_OPSET:
        raise UserError(f"--opset {opset}: the graph needs opset >= {graphs.DEFAULT_OPSET} (the first with RotaryEmbedding).")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another directory.")
    if push_to_hub:  # refuse a bad repo id or a missing token now, not after a long export
        from nomic_export.exporter.publish import check_repo_id, resolve_token

        check_repo_id(push_to_hub)
        token = resolve_token(token)

    log.info("resolve: %s%s", model, f" @ {revision}" if revision else "")
    source = resolve_checkpoint(model, revision=revision)
    log.info("load: %s", source)
    load_model(source)  # every bad-checkpoint error, before any work; memory-mapped, so cheap
    library = None
    if "moe" in variants:
        from nomic_export import custom_ops

        log.info("build op library")
        library = Path(custom_ops.build())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / ONNX_DIR).mkdir()
        moe_path = tmp / variant_onnx_path("moe")
        log.info("export: moe (torch.onnx dynamo, opset %d)", opset)
        _export_moe_graph_in_subprocess(source, moe_path, opset)
        _check_written_opset(moe_path, opset)
        for variant in variants:
            if variant != "moe":
                log.info("export: %s (derived from the moe graph)", variant)
                graphs.derive_variant(moe_path, variant, tmp / variant_onnx_path(variant))
        if "moe" not in variants:
            for f in (moe_path, moe_path.with_name(moe_path.name + "_data")):
                f.unlink()
        if library is not None:
            target = tmp / CUSTOM_OPS_DIR / platform_tag() / LIBRARY_NAME
            target.parent.mkdir(parents=True)
            shutil.copy2(library, target)
        _copy_source_files(source, tmp)

        log.info("verify: %s", ", ".join(variants))
        try:
            results = verify(tmp, source, gates=gates, variants=list(variants))
        except VerificationError as err:
            raise VerificationError(f"export of {model} failed verification; nothing was written.\n{err}", err.results)
        for line in format_table(results).splitlines():
            log.info("%s", line)
        report = _report(model, revision, source, tmp, results, gates, time.monotonic() - started)
        write_report(tmp, report)
        (tmp / MODEL_CARD_NAME).write_text(render_model_card(report, tmp))
        tmp.chmod(0o755)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("done: %s (%.0f s)", out, time.monotonic() - started)
    if push_to_hub:  # only reached once every variant passed verification
        from nomic_export.exporter.publish import publish

        publish(out, push_to_hub, private=private, token=token)
    return report


def _export_moe_graph_in_subprocess(source: Path, path: Path, opset: int) -> None:
    """torch.onnx.export keeps the exported graph, and through it every weight, alive after it returns
    (measured: +1.9 GB RSS at full size that no gc.collect() frees); a child process returns it all.
    A plain ``python -c`` child, not multiprocessing's spawn, which would re-import the caller's script."""
    code = "import sys; from nomic_export.exporter.graphs import export_checkpoint; export_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    done = subprocess.run([sys.executable, "-c", code, str(source), str(path), str(opset)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"exporting the moe graph failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def _check_written_opset(path: Path, opset: int) -> None:
    """torch's exporter falls back to its base opset when it cannot convert to the one asked for (it did for 26
    with torch 2.13), which leaves RotaryEmbedding in a graph too old for it; refuse that here, not in ORT."""
    import onnx
    import torch

    from nomic_export.exporter.graphs import DEFAULT_OPSET

    written = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}.get("", 0)
    if written != opset:
        raise UserError(
            f"--opset {opset}: torch {torch.__version__}'s exporter wrote opset {written} instead; pass an opset it "
            f"can write, such as the default {DEFAULT_OPSET} (23 to 25 export with torch 2.13)."
        )


def _copy_source_files(source: Path, dest: Path) -> None:
    for name in ("config.json", *TOKENIZER_FILES, *SENTENCE_TRANSFORMERS_FILES):
        if (source / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, dest / name)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an old OUT is removed only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        "nomic_export": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _report(model, revision, source: Path, tmp: Path, results: dict, gates: Gates, seconds: float) -> dict:
    is_local = Path(model).expanduser().is_dir()
    files = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    return {
        "source": {
            "model": str(model),
            "revision": revision,
            # a Hub snapshot's folder is named by the commit it holds
            "commit": None if is_local else source.name,
            "local_path": str(source.resolve()) if is_local else None,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(seconds, 1),
        "versions": _versions(),
        "platforms": [platform_tag()] if (tmp / CUSTOM_OPS_DIR).is_dir() else [],
        "gates": {
            "min_cosine": gates.min_cosine,
            "max_rel_abs": gates.max_rel_abs,
            "min_cosine_ortmoe": gates.min_cosine_ortmoe,
        },
        "variants": {v: {"file": variant_onnx_path(v), "verification": r} for v, r in results.items()},
        "files": files,
    }


def write_report(out: Path, report: dict) -> None:
    """Write export_report.json atomically."""
    write_text_atomic(out / REPORT_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def verify_export(out: str | Path, reference: str | None = None, gates: Gates = Gates()) -> dict:
    """``nomic-export verify``: re-verify every variant in OUT and record the figures in its report.

    Args:
        out: an export directory.
        reference: the checkpoint to compare with; default the source recorded in export_report.json.
        gates: the pass marks.
    Returns:
        Per-variant figures. Raises VerificationError (after recording the figures) when a gate fails.
    """
    out = Path(out)
    report_path = out / REPORT_NAME
    if not out.is_dir():
        raise UserError(f"{out}: no such export directory; run `nomic-export export MODEL -o {out}` first.")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if reference is None:
        source = report.get("source", {})
        reference = source.get("local_path") or source.get("model")
        if not reference:
            raise UserError(f"{report_path}: no source recorded; pass --reference MODEL (the exported checkpoint).")
        revision = source.get("commit") or source.get("revision")
    else:
        revision = None
    path = resolve_checkpoint(reference, revision=None if Path(reference).is_dir() else revision)
    try:
        results = verify(out, path, gates=gates)
        failed = None
    except VerificationError as err:
        results, failed = err.results, err
    report.setdefault("variants", {})
    for variant, figures in results.items():
        report["variants"].setdefault(variant, {"file": variant_onnx_path(variant)})["verification"] = figures
    write_report(out, report)
    write_text_atomic(out / MODEL_CARD_NAME, render_model_card(report, out))
    if failed:
        raise failed
    return results
