"""Publishing to the Hub, offline: the dry-run plan, the commit built for a fake HfApi, and every refusal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

from nomic_export.cli import main
from nomic_export.errors import UserError
from nomic_export.exporter.publish import NO_TOKEN_MESSAGE, format_plan, plan_upload, publish
from nomic_export.layout import CUSTOM_OPS_DIR, LIBRARY_NAME, MODEL_CARD_NAME, REPORT_NAME

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefNEVERPRINTED"


class FakeHfApi:
    """Records the calls publish makes; ``fail`` makes create_commit raise it."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail = fail

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", args, kwargs))

    def create_commit(self, *args, **kwargs):
        self.calls.append(("create_commit", args, kwargs))
        if self.fail:
            raise self.fail
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{args[0]}/commit/0123abc"})()

    def call(self, name: str) -> tuple[tuple, dict]:
        (found,) = [(a, k) for n, a, k in self.calls if n == name]
        return found


class NoNetwork:
    """Any use at all fails the test: the code path must not reach the Hub."""

    def __getattr__(self, name):
        raise AssertionError(f"HfApi.{name} was called")


@pytest.fixture
def out(tiny_export, tmp_path) -> Path:
    """A private copy of the verified tiny export (moe, ortmoe, dense)."""
    return Path(shutil.copytree(tiny_export, tmp_path / "out"))


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """No test may construct a real HfApi; tests that need one install a fake."""
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)


def _files(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}


def _set_report(out: Path, change) -> None:
    report = json.loads((out / REPORT_NAME).read_text())
    change(report)
    (out / REPORT_NAME).write_text(json.dumps(report))


def test_dry_run_plan_is_every_file_with_its_size(out):
    result = publish(out, "me/tiny-onnx", dry_run=True, api=NoNetwork())
    assert dict(result["files"]) == _files(out)
    assert [p for p, _ in result["files"]] == sorted(_files(out))
    assert {"onnx/model.onnx_data", f"{CUSTOM_OPS_DIR}/linux-x86_64/{LIBRARY_NAME}", MODEL_CARD_NAME} <= set(_files(out))
    assert result["commit_url"] is None


def test_cli_dry_run_prints_the_plan_and_needs_no_token(out, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["publish", str(out), "--repo-id", "me/tiny-onnx", "--dry-run", "--private"]) == 0
    printed = capsys.readouterr().out
    assert "https://huggingface.co/me/tiny-onnx (branch main, private)" in printed
    for path, size in _files(out).items():
        assert any(line.split() == [f"{size:,}", path] for line in printed.splitlines()), path
    assert printed == format_plan(publish(out, "me/tiny-onnx", private=True, dry_run=True), out) + "\n"


def test_one_commit_with_every_file_of_out(out):
    api = FakeHfApi()
    result = publish(out, "me/tiny-onnx", private=True, token=FAKE_TOKEN, api=api)
    assert [name for name, _, _ in api.calls] == ["create_repo", "create_commit"]
    args, kwargs = api.call("create_repo")
    assert args == ("me/tiny-onnx",) and kwargs["exist_ok"] is True and kwargs["private"] is True
    args, kwargs = api.call("create_commit")
    operations = kwargs["operations"]
    assert all(isinstance(op, huggingface_hub.CommitOperationAdd) for op in operations)
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert set(uploaded) == set(_files(out))
    assert {p: Path(f) for p, f in uploaded.items() if p != REPORT_NAME} == {
        path: (out / path).resolve() for path in _files(out) if path != REPORT_NAME
    }
    # the report goes up without this machine's path to the checkpoint; OUT's own copy keeps it for verify
    local = json.loads((out / REPORT_NAME).read_text())
    public = json.loads(uploaded[REPORT_NAME])
    assert local["source"]["local_path"] and str(Path(local["source"]["local_path"]).parent) not in uploaded[REPORT_NAME].decode()
    assert public["source"]["local_path"] is None and public["source"]["model"] == Path(local["source"]["local_path"]).name
    assert {k: v for k, v in public.items() if k != "source"} == {k: v for k, v in local.items() if k != "source"}
    assert kwargs["revision"] is None and kwargs["repo_type"] == "model"
    assert "nomic-export" in kwargs["commit_message"]
    # the card uploaded names the repository it is in
    card = (out / MODEL_CARD_NAME).read_text()
    assert 'MoETextEmbedding("me/tiny-onnx"' in card and "OWNER/NAME" not in card
    assert result["commit_url"].startswith("https://huggingface.co/me/tiny-onnx/commit/")


def test_branch_and_message(out):
    api = FakeHfApi()
    publish(out, "me/tiny-onnx", revision="onnx", commit_message="first export", token=FAKE_TOKEN, api=api)
    assert [name for name, _, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.call("create_branch")[1]["branch"] == "onnx"
    _, kwargs = api.call("create_commit")
    assert kwargs["revision"] == "onnx" and kwargs["commit_message"] == "first export"


def test_token_is_never_printed_or_logged(out, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    echoed = RuntimeError(f"401 Client Error for url ... headers={{'authorization': 'Bearer {FAKE_TOKEN}'}} token={FAKE_TOKEN}")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: FakeHfApi(fail=echoed))
    assert main(["publish", str(out), "--repo-id", "me/tiny-onnx", "--token", FAKE_TOKEN]) == 2
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: FakeHfApi())
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert main(["publish", str(out), "--repo-id", "me/tiny-onnx"]) == 0
    captured = capsys.readouterr()
    assert "publishing" in captured.err and "RuntimeError" in captured.err and "me/tiny-onnx" in captured.err
    for text in (captured.out, captured.err, caplog.text):
        assert FAKE_TOKEN not in text
        assert FAKE_TOKEN[3:12] not in text


def test_no_token_says_how_to_log_in(out, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="hf auth login") as err:
        publish(out, "me/tiny-onnx", api=NoNetwork())
    assert str(err.value) == NO_TOKEN_MESSAGE


@pytest.mark.parametrize("repo_id", ["tiny-onnx", "me/tiny/onnx", "me/", "/tiny", "me /tiny", "me/tiny--onnx", "me/..x", ""])
def test_malformed_repo_id_is_refused_before_anything(repo_id, tmp_path):
    # a missing OUT and no token: the repo id is the first thing checked
    with pytest.raises(UserError, match="repo id"):
        publish(tmp_path / "missing", repo_id, token=FAKE_TOKEN, api=NoNetwork())


def test_missing_files_are_listed_and_refused(out):
    for name in (MODEL_CARD_NAME, "onnx/model_dense.onnx_data"):
        (out / name).unlink()
    shutil.rmtree(out / CUSTOM_OPS_DIR)
    with pytest.raises(UserError) as err:
        publish(out, "me/tiny-onnx", token=FAKE_TOKEN, api=NoNetwork())
    message = str(err.value)
    assert f"missing: README.md, {CUSTOM_OPS_DIR}/<platform>/{LIBRARY_NAME}, onnx/model_dense.onnx_data." in message


def test_failed_gate_is_refused_unless_allowed_with_a_loud_warning(out, caplog):
    def fail_ortmoe(report):
        report["variants"]["ortmoe"]["verification"] |= {"passed": False, "failures": ["min_cosine 0.9 < 0.999"]}

    _set_report(out, fail_ortmoe)
    with pytest.raises(UserError, match=r"\['ortmoe'\] did not pass verification .*--allow-unverified"):
        publish(out, "me/tiny-onnx", token=FAKE_TOKEN, api=NoNetwork())
    api = FakeHfApi()
    with caplog.at_level(logging.WARNING, logger="nomic_export"):
        publish(out, "me/tiny-onnx", token=FAKE_TOKEN, allow_unverified=True, api=api)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "UNVERIFIED" in warnings[0].getMessage() and "ortmoe" in warnings[0].getMessage()
    assert api.call("create_commit")  # published anyway, as asked
    assert "**FAIL**" in (out / MODEL_CARD_NAME).read_text()  # and the card says so


def test_nothing_outside_out_is_uploaded(out, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the export")
    (out / "extra.txt").symlink_to(secret)
    with pytest.raises(UserError, match="outside"):
        publish(out, "me/tiny-onnx", dry_run=True, api=NoNetwork())
    (out / "extra.txt").unlink()
    (out / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UserError, match="symlink to a directory"):
        plan_upload(out)
    (out / "linked").unlink()
    (out / ".cache").mkdir()
    (out / ".cache" / "junk").write_text("x")
    assert ".cache/junk" not in dict(plan_upload(out))


def test_publish_never_imports_torch(out):
    code = (
        "import sys\n"
        "from nomic_export.exporter.publish import publish\n"
        f"publish({str(out)!r}, 'me/tiny-onnx', dry_run=True)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_export_push_to_hub_refuses_a_bad_repo_id_before_exporting(tiny_checkpoint, tmp_path):
    from nomic_export.exporter.export import export

    with pytest.raises(UserError, match="repo id"):
        export(str(tiny_checkpoint), tmp_path / "out", push_to_hub="not-a-repo-id")
    assert not (tmp_path / "out").exists()


def test_export_push_to_hub_publishes_the_verified_out(tiny_checkpoint, tmp_path, monkeypatch):
    from nomic_export.exporter import publish as publish_module
    from nomic_export.exporter.export import export

    published = []
    monkeypatch.setattr(
        publish_module, "publish",
        lambda out, repo_id, **kw: published.append((out, repo_id, kw, (out / MODEL_CARD_NAME).is_file())),
    )
    export(str(tiny_checkpoint), tmp_path / "out", variants=("dense",), push_to_hub="me/tiny-onnx", private=True, token=FAKE_TOKEN)
    assert published == [(tmp_path / "out", "me/tiny-onnx", {"private": True, "token": FAKE_TOKEN}, True)]
