"""``nomic-export bench`` on the tiny export: the table's structure, the report and card it updates.

Speed itself is measured by the command, never asserted here (numbers live in benchmarks, not tests).
"""

from __future__ import annotations

import json
import shutil

import pytest

from nomic_export.cli import main
from nomic_export.exporter.bench import ModelShape


def test_bench_runs_every_contender_and_records_rows(tiny_export, tiny_checkpoint, tmp_path, capsys):
    out = shutil.copytree(tiny_export, tmp_path / "out")
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", str(out), "--batch", "1,2", "--seq", "8", "--threads", "1", "--rounds", "2",
            "--torch-reference", str(tiny_checkpoint), "--json", str(json_path), "--plot", str(plot_path), "-q"]
    assert main(argv) == 0
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    results = json.loads(json_path.read_text())
    contenders = {r["contender"] for r in results["rows"]}
    assert contenders == {"moe", "ortmoe", "dense", "torch"}
    assert len(results["rows"]) == 4 * 2  # contenders x (batch, seq) cases
    for row in results["rows"]:
        assert row["p90_ms"] >= row["p50_ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["seq"] / row["p50_ms"] * 1e3)
        low, middle, high = row["moe_speedup_rounds"]
        assert 0 < low <= middle <= high
        if row["contender"] == "moe":
            assert row["ratio_to_moe"] == 1.0 and low == high == 1.0
    assert set(results["contenders"]) == {"moe/1", "ortmoe/1", "dense/1", "torch/1"}
    assert all(c["peak_rss_mb"] > 0 and c["session_s"] > 0 for c in results["contenders"].values())
    assert {"1"} == set(results["floor"])  # batch 1 was measured, so the streaming floor was too
    assert len(results["roofline"]) == 2 and all(r["matmul_gflops"] > 0 for r in results["roofline"])
    for name in contenders:
        assert f"\n{name} " in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["benchmarks"] == results["rows"]
    assert "## Benchmarks" in (out / "README.md").read_text() and "No benchmark was run" not in (out / "README.md").read_text()


def test_bench_refuses_an_out_without_the_moe_variant(tiny_export, tmp_path, capsys):
    out = shutil.copytree(tiny_export, tmp_path / "out")
    for f in (out / "onnx").glob("model.onnx*"):
        f.unlink()
    assert main(["bench", str(out), "--batch", "1", "--seq", "8", "--threads", "1", "-q"]) == 2
    assert "no moe variant" in capsys.readouterr().err


def test_bench_rejects_bad_grid_values(tiny_export, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", str(tiny_export), "--batch", "1,x"])
    assert exit_.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_active_flops_of_the_real_model_shape():
    """Counted independently: 12 layers of attention at S=128, 6 dense FFNs, 6 MoE FFNs with 2 experts."""
    shape = ModelShape(hidden=768, heads=12, layers=12, ffn=3072, experts=8, top_k=2, vocab=250048)
    H, F, S = 768, 3072, 128
    attention = 2 * (3 * H * H + H * H) + 2 * (S * H + S * H)
    expected = 12 * attention + 6 * (2 * 2 * H * F) + 6 * (2 * H * 8 + 2 * 2 * 2 * H * F)
    assert shape.active_flops_per_token(S) == expected


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rounds", "0"], "--rounds 0: at least one timed round"),
        (["--json", "{tmp}/no-such-folder/b.json"], "no-such-folder does not exist"),
        (["--plot", "{tmp}/b.txt"], "matplotlib cannot write .txt"),
        (["--torch-reference", "{tmp}/no-such-checkpoint"], "no checkpoint directory"),
        (["--torch-reference", "{tmp}"], "no config.json"),
    ],
    ids=["rounds", "json-folder", "plot-format", "reference-missing", "reference-not-a-checkpoint"],
)
def test_bench_refuses_bad_arguments_before_measuring(tiny_export, tmp_path, capsys, monkeypatch, extra, message):
    from nomic_export.exporter import bench

    def measured(*args, **kwargs):
        raise AssertionError("bench started measuring before refusing its arguments")

    monkeypatch.setattr(bench, "measure_in_child", measured)
    out = shutil.copytree(tiny_export, tmp_path / "out")
    report_before = (out / "export_report.json").read_text()
    argv = ["bench", str(out), "--batch", "1", "--seq", "8", "--threads", "1", "-q"]
    assert main(argv + [a.format(tmp=tmp_path) for a in extra]) == 2
    assert message in capsys.readouterr().err
    assert (out / "export_report.json").read_text() == report_before
    assert not list(tmp_path.glob("b.*"))
