"""``nomic-export publish``: upload a verified OUT directory to the Hugging Face Hub in one commit.

Everything is checked before any network call: the repository id's form, OUT's required files, that
every variant in export_report.json passed verification, and that nothing would be read from outside OUT
(a symlink leading out of it is refused). Files go up through ``HfApi.create_commit``, so large ones take
huggingface_hub's ordinary large-file path; export_report.json goes up without the local path of a local
source (`public_report`). The token is never printed or logged, and errors coming back from the Hub are
re-raised with the token scrubbed from their text.

Torch-free: imports json, pathlib, huggingface_hub and the card renderer only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from nomic_export import __version__
from nomic_export.errors import UserError
from nomic_export.layout import (
    CUSTOM_OPS_DIR,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    REPORT_NAME,
    VARIANTS,
    variant_onnx_path,
    write_text_atomic,
)

log = logging.getLogger(__name__)

REQUIRED_FILES = ("config.json", "tokenizer.json", REPORT_NAME, MODEL_CARD_NAME)
NO_TOKEN_MESSAGE = "no Hugging Face token found; run `hf auth login` or set HF_TOKEN, or pass --token"
# The Hub's own rule (huggingface_hub.utils.validate_repo_id) checks characters and length; it also accepts
# a bare NAME, which would upload into the token owner's namespace by surprise, so OWNER/ is required here.
_OWNER_NAME = re.compile(r"^[^/\s]+/[^/\s]+$")


def check_repo_id(repo_id: str) -> str:
    """Refuse anything but ``OWNER/NAME`` in the Hub's allowed characters; no network."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not _OWNER_NAME.match(repo_id):
        raise UserError(f"repo id {repo_id!r}: expected OWNER/NAME, e.g. my-org/nomic-embed-text-v2-moe-onnx.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"repo id {repo_id!r} is not a valid Hub repository id: {err}") from None
    return repo_id


def resolve_token(token: str | None) -> str:
    """``token`` if given, else the one huggingface_hub finds (HF_TOKEN, then `hf auth login`'s file)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UserError(NO_TOKEN_MESSAGE)
    return found


def plan_upload(out: str | Path) -> list[tuple[str, int]]:
    """Every file of OUT that publish uploads, as (path in the repository, size in bytes), sorted.

    Hidden names (``.cache/`` left by a Hub download, ``.DS_Store``) are skipped. A symlink is followed
    only to a file inside OUT; one leading outside OUT, or to a directory, is refused.

    Args:
        out: an export directory.
    Returns:
        ``[("config.json", 1812), ("onnx/model.onnx", 290408), ...]``
    Example:
        >>> for path, size in plan_upload("out"): print(size, path)
    """
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such export directory; run `nomic-export export MODEL -o {out}` first.")
    root = out.resolve()
    plan = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if (here / d).is_symlink():
                raise UserError(
                    f"{out / (here / d).relative_to(root)} is a symlink to a directory; publish uploads only "
                    "real files inside OUT. Replace it with a copy."
                )
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = here / name
            target = path.resolve()
            if not target.is_relative_to(root):
                raise UserError(
                    f"{out / path.relative_to(root)} links to {str(target)!r}, outside {out}; publish never "
                    "uploads anything outside OUT. Replace the link with a copy of the file."
                )
            if not target.is_file():
                raise UserError(f"{out / path.relative_to(root)} is not a regular file (a broken link?); remove it.")
            plan.append((path.relative_to(root).as_posix(), target.stat().st_size))
    return sorted(plan)


def check_out(out: Path, allow_unverified: bool = False) -> dict:
    """Refuse an OUT with missing files, or whose report shows a failed gate; return the report.

    Every missing file is listed at once, sorted. With ``allow_unverified`` a failed gate is a loud warning.
    """
    missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
    report = {}
    if (out / REPORT_NAME).is_file():
        try:
            report = json.loads((out / REPORT_NAME).read_text())
        except ValueError as err:
            raise UserError(f"{out / REPORT_NAME}: not valid JSON ({err}); re-run `nomic-export verify {out}`.") from None
    variants = [v for v in VARIANTS if v in report.get("variants", {})]
    for v in variants:
        onnx = report["variants"][v].get("file") or variant_onnx_path(v)
        missing += [f for f in (onnx, onnx + "_data") if not (out / f).is_file()]
    if report and not variants:
        missing.append(f"{variant_onnx_path('moe')} (or another variant; the report lists none)")
    if "moe" in variants and not any((out / CUSTOM_OPS_DIR).glob(f"*/{LIBRARY_NAME}")):
        missing.append(f"{CUSTOM_OPS_DIR}/<platform>/{LIBRARY_NAME}")
    if missing:
        raise UserError(
            f"{out} is not a complete export; missing: {', '.join(sorted(missing))}. "
            f"Re-run `nomic-export export MODEL -o {out} --overwrite`."
        )

    failed = {v: report["variants"][v].get("verification") or {} for v in variants}
    failed = {v: f for v, f in failed.items() if f.get("passed") is not True}
    if failed:
        detail = "; ".join(f"{v}: {', '.join(f.get('failures') or ['not verified'])}" for v, f in sorted(failed.items()))
        if not allow_unverified:
            raise UserError(
                f"{out}: variants {sorted(failed)} did not pass verification ({detail}). Re-run "
                f"`nomic-export verify {out}`, or pass --allow-unverified to publish them anyway."
            )
        log.warning("WARNING: publishing UNVERIFIED variants %s of %s (%s): --allow-unverified was given.",
                    sorted(failed), out, detail)
    return report


def publish(
    out: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    allow_unverified: bool = False,
    api=None,
) -> dict:
    """Create ``repo_id`` if needed and upload every file of OUT to it in one commit.

    Args:
        out: a verified export directory.
        repo_id: ``OWNER/NAME``.
        private: create the repository private (an existing repository keeps its visibility).
        revision: the branch to commit to (created from main if missing); default main.
        commit_message: default "Upload ONNX export (nomic-export VERSION)".
        token: a Hub token; default the one huggingface_hub finds. Never printed or logged.
        dry_run: check and plan only; no network, nothing written.
        allow_unverified: publish even if a variant's verification failed, with a loud warning.
        api: an ``HfApi``-like object (tests pass a fake); default ``HfApi()``.
    Returns:
        ``{"repo_id", "revision", "private", "files": [(path, size), ...], "commit_url"}``;
        ``commit_url`` is None for a dry run.
    Example:
        >>> publish("out", "my-org/nomic-embed-text-v2-moe-onnx", private=True)
    """
    out = Path(out)
    check_repo_id(repo_id)
    if not out.is_dir():
        raise UserError(f"{out}: no such export directory; run `nomic-export export MODEL -o {out}` first.")
    report = check_out(out, allow_unverified=allow_unverified)
    result = {"repo_id": repo_id, "revision": revision or "main", "private": private, "commit_url": None}
    if dry_run:
        result["files"] = plan_upload(out)
        return result

    token = resolve_token(token)
    from huggingface_hub import CommitOperationAdd, HfApi

    from nomic_export.exporter.model_card import render_model_card

    # The card's loading snippets name the repository they are read in.
    write_text_atomic(out / MODEL_CARD_NAME, render_model_card(report, out, repo_id=repo_id))
    plan = result["files"] = plan_upload(out)
    root = out.resolve()
    operations = [
        CommitOperationAdd(
            path_in_repo=p,
            path_or_fileobj=public_report(report) if p == REPORT_NAME else str((root / p).resolve()),
        )
        for p, _ in plan
    ]
    api = api if api is not None else HfApi()
    message = commit_message or f"Upload ONNX export (nomic-export {__version__})"
    log.info("publish: %d files, %s, to %s (%s)", len(plan), _human(sum(s for _, s in plan)), repo_id, result["revision"])
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            token=token,
            repo_type="model",
            revision=revision,
        )
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one message without the token
        raise UserError(
            f"publishing {out} to {repo_id!r} failed: {type(err).__name__}: {_scrub(str(err), token)}"
        ) from None
    result["commit_url"] = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    log.info("published: %s", result["commit_url"])
    return result


def public_report(report: dict) -> bytes:
    """The report as uploaded: a local source is named by its folder's name, never by its path on this
    machine (OUT keeps the full path: `verify` reads it as the default reference)."""
    public = json.loads(json.dumps(report))
    source = public.get("source") or {}
    if source.get("local_path"):
        source["model"] = Path(source["local_path"]).name
        source["local_path"] = None
    return (json.dumps(public, indent=2) + "\n").encode()


def format_plan(result: dict, out: str | Path) -> str:
    """The dry-run listing: one line per file with its size, then the total."""
    files = result["files"]
    width = max((len(f"{s:,}") for _, s in files), default=1)
    lines = [
        f"dry run: would upload {len(files)} files from {out} to https://huggingface.co/{result['repo_id']} "
        f"(branch {result['revision']}{', private' if result['private'] else ''}) in one commit"
    ]
    lines += [f"  {size:>{width},}  {path}" for path, size in files]
    lines.append(f"  total {_human(sum(s for _, s in files))}; nothing was uploaded")
    return "\n".join(lines)


def _scrub(text: str, token: str | None) -> str:
    """Remove the token, and any bearer credential, from text that may echo request headers."""
    if token:
        text = text.replace(token, "***")
    return re.sub(r"(?i)(bearer\s+|authorization['\"]?\s*[:=]\s*['\"]?)\S+", r"\1***", text)


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"
