"""The ONNX export: graph shape, dynamic routing and shapes, verification gates, atomic output, CLI errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from nomic_export import custom_ops
from nomic_export.cli import main
from nomic_export.errors import VerificationError
from nomic_export.exporter.export import verify_export
from nomic_export.exporter.model import pool
from nomic_export.exporter.verify import PROBE_TEXTS, open_session
from nomic_export.layout import VARIANTS, platform_tag, variant_onnx_path

# fp32 ORT vs fp32 torch on the tiny model: summation order only
EXACT_REL_TOL = 1e-5


def run(out, variant, ids, mask):
    session, _ = open_session(out, variant)
    return session.run(None, {"input_ids": ids, "attention_mask": mask})


def reference(model, ids, mask):
    with torch.no_grad():
        h = model(torch.from_numpy(ids), torch.from_numpy(mask))
        return h.numpy(), pool(h, torch.from_numpy(mask)).numpy()


def routes(model, ids, mask):
    """Top-2 expert sets per MoE layer, per real token, from the reference (hooks on the MoE inputs)."""
    captured = []
    layers = [b.mlp for b in model.encoder.layers if hasattr(b.mlp, "router")]
    hooks = [m.register_forward_pre_hook(lambda _, a: captured.append(a[0].reshape(-1, a[0].shape[-1]))) for m in layers]
    with torch.no_grad():
        model(torch.from_numpy(ids), torch.from_numpy(mask))
    for h in hooks:
        h.remove()
    real = torch.from_numpy(mask).reshape(-1).bool()
    return [(x @ m.router.layer.weight.T).topk(2).indices[real].sort(-1).values for x, m in zip(captured, layers)]


def test_out_layout_and_report(tiny_export):
    for variant in VARIANTS:
        graph, data = tiny_export / variant_onnx_path(variant), tiny_export / (variant_onnx_path(variant) + "_data")
        assert graph.is_file() and data.is_file()
        assert data.stat().st_mode == graph.stat().st_mode, variant  # readable by whoever may read the graph
    assert (tiny_export / "custom_ops" / platform_tag() / "libnomic_moe_ops.so").is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json"):
        assert (tiny_export / name).is_file(), name
    report = json.loads((tiny_export / "export_report.json").read_text())
    assert set(report["variants"]) == set(VARIANTS)
    for variant, entry in report["variants"].items():
        figures = entry["verification"]
        assert figures["passed"], (variant, figures)
        assert figures["texts"] == len(PROBE_TEXTS) >= 32
    assert report["variants"]["moe"]["verification"]["rel_max_abs_error"] <= 1e-4
    assert report["files"]["onnx/model.onnx_data"]["bytes"] == (tiny_export / "onnx/model.onnx_data").stat().st_size
    assert {"torch", "onnx", "onnxruntime"} <= set(report["versions"])


def test_moe_graph_has_one_custom_node_per_moe_layer(tiny_export, tiny_model):
    model = onnx.load(str(tiny_export / "onnx/model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(tiny_export / "onnx/model.onnx"))
    moe = [n for n in model.graph.node if n.domain == custom_ops.DOMAIN]
    assert [n.op_type for n in moe] == ["MoE", "MoE"]  # layers 1 and 3 of the tiny model
    initializers = {t.name for t in model.graph.initializer}
    for node in moe:
        assert set(node.input[1:5]) <= initializers  # router, w1, w2, bias are weights, not computed
    assert {o.domain: o.version for o in model.opset_import}[custom_ops.DOMAIN] == custom_ops.OP_VERSION
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param for d in t.shape.dim)  # both dims dynamic
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "sentence_embedding"]
    # weights stored once: every initializer the graph names is saved once in the data file
    assert len(initializers) == len(model.graph.initializer)


def test_rope_is_one_rotary_embedding_node_per_q_and_k(tiny_export, tiny_model):
    """RoPE exports as ONNX RotaryEmbedding (opset 23), not as the slower six-op decomposition."""
    model = onnx.load(str(tiny_export / "onnx/model.onnx"), load_external_data=False)
    cfg = tiny_model.config
    assert {o.domain: o.version for o in model.opset_import}[""] == 23
    rope = [n for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rope) == 2 * cfg.num_layers
    for node in rope:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("interleaved", 0) == 0 and attrs["num_heads"] == cfg.num_heads  # NeoX halves (trap 6)
    assert not [n for n in model.graph.node if n.op_type == "Neg"]  # rotate_half's decomposition is gone


def test_opset_below_23_exits_2(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_checkpoint), "-o", str(out), "--opset", "22", "-q"]) == 2
    assert "needs opset >= 23" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("variant", ["ortmoe", "dense"])
def test_derived_variants_have_no_custom_node(tiny_export, variant):
    model = onnx.load(str(tiny_export / variant_onnx_path(variant)), load_external_data=False)
    onnx.checker.check_model(str(tiny_export / variant_onnx_path(variant)))
    domains = {n.domain for n in model.graph.node}
    assert custom_ops.DOMAIN not in domains
    assert domains <= ({"", "com.microsoft"} if variant == "ortmoe" else {""})


@pytest.mark.parametrize("variant", VARIANTS)
def test_routing_is_not_baked_into_the_graph(tiny_export, tiny_model, variant):
    """Inputs that route differently from the export's example, including one where most experts get no token."""
    rng = np.random.default_rng(0)
    vocab = tiny_model.config.vocab_size
    cases = [
        (np.array([[0, 77, 2]]), np.ones((1, 3), np.int64)),  # 3 tokens: at most 6 of 8 experts used
        (rng.integers(4, vocab - 1, (2, 40)), np.ones((2, 40), np.int64)),
        (rng.integers(4, vocab - 1, (3, 9)), np.ones((3, 9), np.int64)),
    ]
    seen = []
    for ids, mask in cases:
        ids = ids.astype(np.int64)
        h, e = run(tiny_export, variant, ids, mask)
        h_ref, e_ref = reference(tiny_model, ids, mask)
        tol = 1e-3 if variant == "ortmoe" else EXACT_REL_TOL  # ortmoe: tanh GELU
        assert np.abs(h - h_ref).max() <= tol * np.abs(h_ref).max()
        seen.append(routes(tiny_model, ids, mask))
    first_layer_experts = [set(r[0].flatten().tolist()) for r in seen]
    assert len(first_layer_experts[0]) < 8  # some experts receive no token
    assert first_layer_experts[0] != first_layer_experts[1]


@pytest.mark.parametrize("batch,seq", [(1, 1), (4, 7), (2, 600)])
def test_dynamic_batch_and_sequence_beyond_the_export_length(tiny_export, tiny_model, batch, seq):
    rng = np.random.default_rng(seq)
    ids = rng.integers(4, tiny_model.config.vocab_size - 1, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[-1, seq // 2 + 1 :] = 0  # a padded row
    h, e = run(tiny_export, "moe", ids, mask)
    h_ref, e_ref = reference(tiny_model, ids, mask)
    real = mask.astype(bool)
    assert h.shape == (batch, seq, 64) and e.shape == (batch, 64)
    assert np.abs(h - h_ref)[real].max() <= EXACT_REL_TOL * np.abs(h_ref[real]).max()
    np.testing.assert_allclose(e, e_ref, atol=1e-5)


def test_verify_rejects_renormalised_routing(tiny_export, tmp_path, tiny_checkpoint):
    out = shutil.copytree(tiny_export, tmp_path / "bad")
    path = out / "onnx/model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == custom_ops.DOMAIN:
            (attr,) = [a for a in node.attribute if a.name == custom_ops.ATTR_NORMALIZE]
            attr.i = 1  # trap 1: renormalised top-2 weights
    onnx.save(model, str(path))
    with pytest.raises(VerificationError, match="moe: .*FAIL|moe: relative max-abs") as err:
        verify_export(out, reference=str(tiny_checkpoint))
    assert not err.value.results["moe"]["passed"] and err.value.results["dense"]["passed"]
    report = json.loads((out / "export_report.json").read_text())
    assert report["variants"]["moe"]["verification"]["passed"] is False  # the figures are recorded


def test_verify_command_prints_the_table(tiny_export, tmp_path, capsys):
    out = shutil.copytree(tiny_export, tmp_path / "copy")
    assert main(["verify", str(out), "-q"]) == 0
    table = capsys.readouterr().out
    for variant in VARIANTS:
        assert f"\n{variant} " in table


# ------------------------------------------------------------------------------- the CLI and OUT


def test_failed_gate_exits_1_and_keeps_no_out(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_checkpoint), "-o", str(out), "--variants", "dense", "--max-rel-abs", "1e-12", "-q"]) == 1
    assert "failed verification" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from nomic_export.exporter import graphs

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graphs, "derive_variant", interrupt)
    out = tmp_path / "out"
    assert main(["export", str(tiny_checkpoint), "-o", str(out), "--variants", "moe,dense", "-q"]) == 130
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary sibling


def test_existing_out_refused_then_overwritten(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_checkpoint), "-o", str(out), "--variants", "dense", "-q"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(tiny_checkpoint), "-o", str(out), "--variants", "dense", "--overwrite", "-q"]) == 0
    assert not (out / "keep.txt").exists() and (out / "onnx/model_dense.onnx").is_file()
    assert not (out / "onnx/model.onnx").exists()  # only the variants asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "break_it,message",
    [
        (None, "no checkpoint directory"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768})), "model_type is 'bert'"),
    ],
    ids=["missing-dir", "plain-bert"],
)
def test_bad_model_exits_2_and_writes_nothing(tiny_copy, tmp_path, capsys, break_it, message):
    model = tmp_path / "no-such-dir" if break_it is None else tiny_copy
    if break_it:
        break_it(tiny_copy)
    out = tmp_path / "out"
    assert main(["export", str(model), "-o", str(out), "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_variant_exits_2(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), "-o", str(tmp_path / "o"), "--variants", "moe,fast"]) == 2
    assert "unknown ['fast']" in capsys.readouterr().err


def test_an_opset_the_exporter_did_not_write_exits_2(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """torch's exporter falls back to its base opset when it cannot convert (opset 26 with torch 2.13)."""
    from onnx import helper

    from nomic_export.exporter import export as export_module

    def fallen_back(source, path, opset):
        graph = helper.make_graph([], "g", [], [])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))

    monkeypatch.setattr(export_module, "_export_moe_graph_in_subprocess", fallen_back)
    out = tmp_path / "out"
    assert main(["export", str(tiny_checkpoint), "-o", str(out), "--opset", "24", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--opset 24: torch" in err and "wrote opset 18 instead" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_truncated_weights_file_is_a_clear_error(tiny_export, tmp_path, capsys):
    out = shutil.copytree(tiny_export, tmp_path / "out")
    data = out / (variant_onnx_path("moe") + "_data")
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    assert main(["verify", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{out / variant_onnx_path('moe')}: onnxruntime" in err and "cannot load it" in err
    assert main(["embed", str(out), "hello"]) == 2
    assert "cannot load it" in capsys.readouterr().err
