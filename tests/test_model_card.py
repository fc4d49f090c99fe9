"""The model card: rendered from a real tiny export's report, its figures and snippets true to that export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub.repocard import metadata_load

from nomic_export.exporter.model_card import (
    DEFAULT_BASE_MODEL,
    DEFAULT_LICENSE,
    format_cosine,
    format_error,
    format_number,
    format_ratio,
    render_model_card,
)
from nomic_export.layout import CUSTOM_OPS_DIR, LIBRARY_NAME, MODEL_CARD_NAME, REPORT_NAME, TASK_PREFIXES


@pytest.fixture
def out(tiny_export, tmp_path) -> Path:
    """A private copy of the verified tiny export, for tests that change it."""
    return Path(shutil.copytree(tiny_export, tmp_path / "out"))


def _report(out: Path) -> dict:
    return json.loads((out / REPORT_NAME).read_text())


def _code_block(card: str, heading: str) -> str:
    """The first fenced code block after ``heading``."""
    rest = card[card.index(heading):]
    return re.search(r"```\w*\n(.*?)```", rest, re.S).group(1)


def _row(card: str, section: str, first_cell: str) -> list[str]:
    body = card[card.index(section):]
    line = next(line for line in body.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_export_writes_the_card_and_its_front_matter_is_hub_metadata(tiny_export):
    meta = metadata_load(tiny_export / MODEL_CARD_NAME)  # the Hub client's own YAML parser
    assert meta["base_model"] == DEFAULT_BASE_MODEL  # a local source has no Hub id
    assert meta["license"] == DEFAULT_LICENSE  # the tiny source has no README.md
    assert meta["pipeline_tag"] == "sentence-similarity"
    assert meta["library_name"] == "onnx"
    assert meta["base_model_relation"] == "quantized"
    assert {"onnx", "moe", "custom-op"} <= set(meta["tags"])


def test_verification_table_shows_the_reports_figures(tiny_export):
    card = (tiny_export / MODEL_CARD_NAME).read_text()
    report = _report(tiny_export)
    assert set(report["variants"]) == {"moe", "ortmoe", "dense"}
    for variant, entry in report["variants"].items():
        f = entry["verification"]
        cells = _row(card, "## Verification", variant)
        assert cells[1:5] == [
            format_cosine(f["min_cosine"]),
            format_error(f["max_abs_error"]),
            format_error(f["rel_max_abs_error"]),
            format_ratio(f["routing_agreement"]),
        ]
        assert cells[5] == f"{f['tokens']} / {f['texts']}"
        assert cells[6] == "pass"
    for name, value in report["gates"].items():
        assert f"`{name}` = {value}" in card


def test_figures_are_read_not_typed(out):
    """Changed figures in the report change the card: nothing is hard-coded."""
    report = _report(out)
    report["variants"]["ortmoe"]["verification"] |= {"min_cosine": 0.12345678, "max_abs_error": 9.876e-2, "passed": False}
    cells = _row(render_model_card(report, out), "## Verification", "ortmoe")
    assert cells[1:3] == ["0.12345678", "9.876e-02"]
    assert cells[6] == "**FAIL**"


def test_lists_the_op_library_platforms_included(tiny_export):
    card = (tiny_export / MODEL_CARD_NAME).read_text()
    platforms = sorted(p.name for p in (tiny_export / CUSTOM_OPS_DIR).iterdir())
    assert platforms == _report(tiny_export)["platforms"]
    for platform in platforms:
        assert f"`{CUSTOM_OPS_DIR}/{platform}/{LIBRARY_NAME}`" in card


def test_snippets_tasks_and_source(tiny_export):
    card = (tiny_export / MODEL_CARD_NAME).read_text()
    hidden = json.loads((tiny_export / "config.json").read_text())["n_embd"]
    assert 'MoETextEmbedding("OWNER/NAME", variant="moe")' in card
    assert "so.register_custom_ops_library(" in card and "ort.InferenceSession(" in card
    assert '.with_operator_library("custom_ops/' in card and '.commit_from_file("onnx/model.onnx")?' in card
    fastembed = _code_block(card, "### fastembed")
    assert "pooling=PoolingType.MEAN" in fastembed and "normalization=True" in fastembed
    assert f"dim={hidden}," in fastembed
    assert 'model_file="onnx/model_ortmoe.onnx"' in fastembed
    assert 'additional_files=["onnx/model_ortmoe.onnx_data"]' in fastembed
    for prefix in TASK_PREFIXES.values():
        assert f"`{prefix}`" in card
    assert "Matryoshka" in card
    assert "a local checkpoint directory (`tiny`)" in card  # the directory's name, not its full path
    assert "No benchmark was run" in card


def test_python_onnxruntime_snippet_runs_on_the_export(tiny_export, monkeypatch):
    """The snippet as printed, with the download answered by the local export."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(tiny_export))
    code = _code_block((tiny_export / MODEL_CARD_NAME).read_text(), "### onnxruntime in Python")
    namespace: dict = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)
    hidden = json.loads((tiny_export / "config.json").read_text())["n_embd"]
    assert namespace["sentence_embedding"].shape == (2, hidden)
    np.testing.assert_allclose(np.linalg.norm(namespace["small"], axis=1), 1.0, rtol=1e-5)


def test_runtime_snippet_runs_on_the_export(tiny_export):
    code = _code_block((tiny_export / MODEL_CARD_NAME).read_text(), "### nomic-export's runtime")
    namespace: dict = {}
    exec(compile(code.replace('"OWNER/NAME"', repr(str(tiny_export))), "model-card-snippet", "exec"), namespace)
    assert len(namespace["queries"]) == len(namespace["documents"]) == len(namespace["small"]) == 1


def test_benchmark_rows_render_as_a_table(out):
    report = _report(out)
    report["benchmarks"] = [
        {"contender": "moe", "batch": 1, "seq": 128, "threads": 2, "tokens_per_s": 1843.27,
         "p50_ms": 69.44, "p90_ms": 71.0, "ratio_to_moe": 1.0},
        {"contender": "dense", "batch": 1, "seq": 128, "threads": 2, "tokens_per_s": 512.5,
         "p50_ms": 249.9, "p90_ms": 260.1, "ratio_to_moe": 0.278, "note": "every expert"},
    ]
    card = render_model_card(report, out)
    assert "No benchmark was run" not in card
    header = "| contender | batch | seq | threads | tokens_per_s | p50_ms | p90_ms | ratio_to_moe | note |"
    assert header in card
    assert _row(card, "## Benchmarks", "dense") == ["dense", "1", "128", "2", "512", "250", "260", "0.278", "every expert"]
    assert _row(card, "## Benchmarks", "moe")[-1] == "–"
    assert format_number(1843.27) == "1843" and format_number(69.44) == "69.44"
    assert format_number([0.8734, 1.0612, 1.2]) == "0.873 / 1.06 / 1.20"  # moe_speedup_rounds: min / median / max


def test_license_from_the_source_and_kept_by_later_renders(out, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    report = _report(out)
    report["source"]["local_path"] = str(source)
    (out / MODEL_CARD_NAME).write_text(render_model_card(report, out))
    assert metadata_load(out / MODEL_CARD_NAME)["license"] == "mit"
    shutil.rmtree(source)  # verify or publish later, with the source gone: the card keeps what it said
    assert metadata_load(out / MODEL_CARD_NAME)["license"] == "mit"
    (out / MODEL_CARD_NAME).write_text(render_model_card(report, out))
    assert metadata_load(out / MODEL_CARD_NAME)["license"] == "mit"


def test_hub_source_is_the_base_model_and_repo_id_is_kept(out):
    report = _report(out)
    report["source"] = {"model": "someone/nomic-finetune", "revision": "v1", "commit": "abc123", "local_path": None}
    card = render_model_card(report, out, repo_id="me/tiny-onnx")
    assert "base_model: someone/nomic-finetune" in card
    assert "`abc123`" in card and "`v1`" in card
    assert "OWNER/NAME" not in card and 'sources=ModelSource(hf="me/tiny-onnx")' in card
    (out / MODEL_CARD_NAME).write_text(card)
    assert 'MoETextEmbedding("me/tiny-onnx"' in render_model_card(report, out)  # e.g. verify re-rendering


def test_verify_rerenders_the_card(out):
    from nomic_export.exporter.export import verify_export

    (out / MODEL_CARD_NAME).write_text("stale")
    verify_export(out)
    card = (out / MODEL_CARD_NAME).read_text()
    report = _report(out)
    assert _row(card, "## Verification", "moe")[1] == format_cosine(report["variants"]["moe"]["verification"]["min_cosine"])


def test_a_card_write_that_fails_midway_keeps_the_old_card(out, monkeypatch):
    """verify, bench and publish rewrite OUT's card and report; a failure while writing must leave the old file."""
    from nomic_export.layout import write_text_atomic

    card = out / MODEL_CARD_NAME
    before = card.read_text()
    real_write = Path.write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError):
        write_text_atomic(card, "a new card\n" * 100)
    monkeypatch.undo()
    assert card.read_text() == before
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
