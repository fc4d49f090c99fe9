"""The torch-free runtime: MoETextEmbedding on the tiny export, its batching, inputs, errors, CLI and threads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nomic_export.cli import main
from nomic_export.errors import UserError
from nomic_export.layout import MAX_TOKENS, ORT_CONFIG_ENTRIES, TASK_PREFIXES, apply_ort_config, platform_tag, variant_onnx_path
from nomic_export.runtime import EmbedStats, MoETextEmbedding
from nomic_export.runtime.embedding import (
    allow_patterns,
    check_onnxruntime_version,
    is_hub_id,
    resolve_model_dir,
    truncate_normalise,
)

# fp32: a text embedded alone or padded into a batch differs only in summation order inside ORT's kernels.
BATCHING_ATOL = 1e-5
# fp32: the same batch run concurrently from several threads; ORT's CPU kernels are deterministic per shape,
# so anything above rounding noise means shared state between calls.
THREADS_ATOL = 1e-6

TEXTS = [
    "Hello!",
    "",
    "search_document: Paris is the capital and largest city of France.",
    "¿Cómo estás?",
    "Машинное обучение — это область искусственного интеллекта.",
    "東京は日本の首都です。",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 8,
    "classification: 1234567890 !@#$%^&*()",
]
LONG_TEXT = "token " * (2 * MAX_TOKENS)


@pytest.fixture(scope="module", params=["moe", "ortmoe", "dense"])
def embedder(request, tiny_export) -> MoETextEmbedding:
    return MoETextEmbedding(tiny_export, variant=request.param, threads=1)


@pytest.fixture(scope="module")
def moe(tiny_export) -> MoETextEmbedding:
    return MoETextEmbedding(tiny_export, threads=2)


def alone(model: MoETextEmbedding, text: str) -> np.ndarray:
    """The graph's own sentence_embedding for one unpadded text."""
    batch = model.tokenize([text])
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    return model.session.run(["sentence_embedding"], feeds)[0][0]


# ---- what embed computes ----


def test_embed_matches_each_text_run_alone_in_callers_order(embedder):
    vectors = list(embedder.embed(TEXTS, batch_size=3))
    assert len(vectors) == len(TEXTS)
    for text, vector in zip(TEXTS, vectors):
        assert vector.shape == (embedder.hidden_size,) and vector.dtype == np.float32
        np.testing.assert_allclose(vector, alone(embedder, text), atol=BATCHING_ATOL, err_msg=repr(text))
        assert abs(np.linalg.norm(vector) - 1) < 1e-5


def test_batches_are_padded_only_to_their_own_longest(moe):
    stats = EmbedStats()
    list(moe.embed(TEXTS, batch_size=3, stats=stats))
    lengths = sorted(len(moe.tokenizer.encode(t).ids) for t in TEXTS)
    batches = [lengths[i : i + 3] for i in range(0, len(lengths), 3)]
    assert stats.texts == len(TEXTS)
    assert stats.tokens == sum(lengths)
    assert stats.padded_tokens == sum(len(b) * max(b) for b in batches)


def test_streams_over_an_iterable_longer_than_one_window(moe):
    # batch_size 1 makes a window of 16 texts: 40 texts cross two window boundaries
    texts = [f"text number {i} " + "x " * (i % 7) for i in range(40)]
    streamed = np.stack(list(moe.embed(iter(texts), batch_size=1)))
    together = np.stack(list(moe.embed(texts, batch_size=64)))
    np.testing.assert_allclose(streamed, together, atol=BATCHING_ATOL)


def test_truncation_at_max_tokens_is_counted(moe):
    stats = EmbedStats()
    vectors = list(moe.embed(["short", LONG_TEXT, "also short", LONG_TEXT], stats=stats))
    assert len(vectors) == 4
    assert stats.truncated == 2 and stats.truncated_indices == [1, 3]
    batch = moe.tokenize([LONG_TEXT])
    assert batch.input_ids.shape == (1, MAX_TOKENS) and batch.truncated == [True]
    assert batch.input_ids[0, 0] == 0 and batch.input_ids[0, -1] == 2  # <s> ... </s> survive truncation


def test_embed_adds_a_prefix_only_for_a_task(moe):
    text = "What is the capital of France?"
    plain = next(moe.embed(text))
    np.testing.assert_allclose(plain, alone(moe, text), atol=BATCHING_ATOL)
    for task, prefix in TASK_PREFIXES.items():
        np.testing.assert_allclose(next(moe.embed([text], task=task)), alone(moe, prefix + text), atol=BATCHING_ATOL)
    np.testing.assert_allclose(next(moe.query_embed(text)), alone(moe, "search_query: " + text), atol=BATCHING_ATOL)
    np.testing.assert_allclose(next(moe.passage_embed([text])), alone(moe, "search_document: " + text), atol=BATCHING_ATOL)


def test_matryoshka_truncates_the_pooled_vector_then_normalises():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((5, 768)).astype(np.float32)  # unnormalised masked means
    normalised = mean / np.linalg.norm(mean, axis=-1, keepdims=True)  # what the graph outputs
    for dim in (64, 256, 768):
        expected = mean[:, :dim] / np.linalg.norm(mean[:, :dim], axis=-1, keepdims=True)
        np.testing.assert_allclose(truncate_normalise(normalised, dim), expected, atol=1e-6)


def test_dim_bounds_follow_the_model(moe):
    # the tiny model's hidden size is 64, so 64 is both bounds there (768 on the real model)
    np.testing.assert_allclose(next(moe.embed("Hello!", dim=64)), next(moe.embed("Hello!")), atol=0)
    for bad in (0, 32, 63, 65, 768, True, 64.0):
        with pytest.raises(ValueError, match="Matryoshka dims run from 64 to 64"):
            moe.embed("Hello!", dim=bad)


# ---- bad input ----


def test_empty_list_gives_empty_result_and_empty_string_embeds(moe):
    assert list(moe.embed([])) == []
    assert moe.tokenize([]).input_ids.shape == (0, 0)
    assert moe.tokenize([""]).input_ids.tolist() == [[0, 2]]  # <s></s>
    (vector,) = moe.embed([""])
    assert np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_non_string_item_is_a_type_error_naming_its_index(moe):
    with pytest.raises(TypeError, match=r"documents\[1\] is int 3"):
        list(moe.embed(["a", 3]))
    texts = ["fine"] * 20 + [None]  # past the first window (16 texts at batch_size 1)
    with pytest.raises(TypeError, match=r"documents\[20\] is NoneType"):
        list(moe.embed(texts, batch_size=1))
    with pytest.raises(TypeError, match=r"documents is NoneType None; pass a str or an iterable of str"):
        moe.embed(None)  # refused at the call, not at the first next()


def test_bad_task_and_batch_size_are_refused_at_the_call(moe):
    with pytest.raises(ValueError, match="unknown task 'search'"):
        moe.embed(["a"], task="search")
    with pytest.raises(ValueError, match="batch_size is 0"):
        moe.embed(["a"], batch_size=0)


def test_onnxruntime_older_than_1_23_is_refused():
    for old in ("1.22.1", "1.20.1", "1.9.0", "0.99"):
        with pytest.raises(UserError, match=r"onnxruntime .* is too old.*>= 1\.23"):
            check_onnxruntime_version(old)
    for ok in ("1.23.0", "1.23.2", "1.32.0", "2.0.0.dev1"):
        check_onnxruntime_version(ok)


def _export_without_library(tiny_export: Path, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_export, dest, ignore=shutil.ignore_patterns("custom_ops")))


def test_out_without_library_says_how_to_build_one(tiny_export, tmp_path, monkeypatch):
    out = _export_without_library(tiny_export, tmp_path / "out")
    monkeypatch.setenv("NOMIC_EXPORT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("NOMIC_EXPORT_MOE_LIBRARY", raising=False)
    with pytest.raises(UserError, match=rf"no op library for this platform.*{platform_tag()}.*nomic-export build-ops.*ortmoe"):
        MoETextEmbedding(out)
    MoETextEmbedding(out, variant="dense")  # the other variants need no library


def test_out_without_library_falls_back_to_the_installed_build(tiny_export, tmp_path, monkeypatch):
    out = _export_without_library(tiny_export, tmp_path / "out")
    library = tiny_export / "custom_ops" / platform_tag() / "libnomic_moe_ops.so"
    monkeypatch.setenv("NOMIC_EXPORT_MOE_LIBRARY", str(library))
    model = MoETextEmbedding(out, threads=1)
    assert model.op_library == library.resolve()
    assert np.isfinite(next(model.embed("Hello!"))).all()


def test_missing_variant_or_directory_is_a_user_error(tiny_export, tmp_path):
    with pytest.raises(UserError, match="is not a directory, nor a Hub id"):
        MoETextEmbedding(tmp_path / "nothing")
    out = Path(shutil.copytree(tiny_export, tmp_path / "out", ignore=shutil.ignore_patterns("model_dense*")))
    with pytest.raises(UserError, match=r"no onnx/model_dense.onnx.*variants present: moe, ortmoe"):
        MoETextEmbedding(out, variant="dense")
    with pytest.raises(UserError, match="unknown variant 'fp16'"):
        MoETextEmbedding(out, variant="fp16")


# ---- the Hub ----


def test_allow_patterns_are_exactly_the_variants_files():
    common = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    assert allow_patterns("moe", "linux-x86_64") == [
        "onnx/model.onnx", "onnx/model.onnx_data", *common, "custom_ops/linux-x86_64/*"
    ]
    assert allow_patterns("ortmoe") == ["onnx/model_ortmoe.onnx", "onnx/model_ortmoe.onnx_data", *common]
    assert allow_patterns("dense") == ["onnx/model_dense.onnx", "onnx/model_dense.onnx_data", *common]


def test_local_directory_or_hub_id(tiny_export, tmp_path, monkeypatch):
    assert not is_hub_id(str(tiny_export))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nomic-ai" / "local-copy").mkdir(parents=True)
    assert not is_hub_id("nomic-ai/local-copy")  # an existing relative path wins over the Hub
    assert is_hub_id("nomic-ai/nomic-embed-text-v2-moe")
    for local in ("./out", "/abs/missing", "~/out", "../x/y", "plain-name", "a/b/c"):
        assert not is_hub_id(local), local


def test_hub_id_downloads_only_the_variants_files(tiny_export, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_export)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("nomic-ai/some-export", "ortmoe", cache_dir="/c", revision="v1") == tiny_export
    model = MoETextEmbedding("nomic-ai/some-export", variant="moe", threads=1)
    assert model.op_library == tiny_export / "custom_ops" / platform_tag() / "libnomic_moe_ops.so"
    assert calls == [
        ("nomic-ai/some-export", {"revision": "v1", "cache_dir": "/c", "allow_patterns": allow_patterns("ortmoe")}),
        ("nomic-ai/some-export", {"revision": None, "cache_dir": None, "allow_patterns": allow_patterns("moe")}),
    ]


# ---- threads ----


def test_eight_threads_at_once_give_the_serial_vectors(moe):
    texts = TEXTS + [LONG_TEXT] + [f"thread text {i}" for i in range(20)]
    serial = np.stack(list(moe.embed(texts, batch_size=4)))
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(8)

    def work(worker: int) -> None:
        barrier.wait()  # start together, so the calls overlap
        results[worker] = np.stack(list(moe.embed(texts, batch_size=4)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8))
    for worker, vectors in results.items():
        np.testing.assert_allclose(vectors, serial, atol=THREADS_ATOL, err_msg=f"thread {worker}")


# ---- the CLI ----


def test_cli_embed_prints_one_json_line_per_text(tiny_export, tmp_path, capsys, moe):
    lines = tmp_path / "texts.txt"
    lines.write_text("from a file\n\n", encoding="utf-8")
    assert main(["embed", str(tiny_export), "Hello!", "", "--file", str(lines), "--task", "search_query", "--dim", "64"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["Hello!", "", "from a file", ""]
    expected = list(moe.embed(["Hello!", "", "from a file", ""], task="search_query"))
    for row, vector in zip(rows, expected):
        np.testing.assert_allclose(np.array(row["embedding"], dtype=np.float32), vector, atol=BATCHING_ATOL)


def test_cli_embed_takes_texts_after_options(tiny_export, capsys, moe):
    assert main(["embed", str(tiny_export), "first", "--task", "search_query", "--dim", "64", "second", "third"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["first", "second", "third"]
    expected = list(moe.embed(["first", "second", "third"], task="search_query"))
    for row, vector in zip(rows, expected):
        np.testing.assert_allclose(np.array(row["embedding"], dtype=np.float32), vector, atol=BATCHING_ATOL)
    with pytest.raises(SystemExit) as exit_:
        main(["embed", str(tiny_export), "--dim", "64", "text", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: text --no-such-flag" in capsys.readouterr().err


def test_cli_embed_bad_input_exits_2(tiny_export, tmp_path, capsys):
    assert main(["embed", str(tiny_export), "x", "--dim", "32"]) == 2
    assert "dim is 32" in capsys.readouterr().err
    assert main(["embed", str(tiny_export), "x", "--threads", "-1"]) == 2
    assert "threads is -1" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "missing"), "x"]) == 2
    assert main(["embed", str(tiny_export), "--file", str(tmp_path / "no.txt")]) == 2


# ---- torch-free ----

_TORCH_FREE = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from nomic_export.runtime import MoETextEmbedding
for variant in ("moe", "ortmoe", "dense"):
    vector = next(MoETextEmbedding(sys.argv[1], variant=variant, threads=1).embed(["Hello!"]))
    assert vector.shape == (64,), vector.shape
from nomic_export.cli import main
code = main(["embed", sys.argv[1], "Hello!", "--task", "search_query"])
assert code == 0, code
assert sys.modules["torch"] is None
"""


def test_runtime_and_cli_embed_never_import_torch(tiny_export):
    env = {k: v for k, v in os.environ.items() if k != "NOMIC_EXPORT_MOE_LIBRARY"}
    result = subprocess.run([sys.executable, "-c", _TORCH_FREE, str(tiny_export)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["text"] == "Hello!"


def test_sessions_keep_residual_add_and_layernorm_unfused(moe, tiny_export, tmp_path):
    """ORT_CONFIG_ENTRIES reach the runtime's session, and in this ORT they stop the SkipLayerNormalization
    fusion (which would otherwise happen: the counter-check) that made the model slower."""
    options = moe.session.get_session_options()
    for key, value in ORT_CONFIG_ENTRIES.items():
        assert options.get_session_config_entry(key) == value

    def optimized_ops(configure: bool) -> set[str]:
        so = ort.SessionOptions()
        if configure:
            apply_ort_config(so)
        so.optimized_model_filepath = str(tmp_path / f"optimized-{configure}.onnx")
        ort.InferenceSession(str(tiny_export / variant_onnx_path("dense")), so, providers=["CPUExecutionProvider"])
        return {node.op_type for node in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node}

    assert "SkipLayerNormalization" in optimized_ops(configure=False)
    configured = optimized_ops(configure=True)
    assert "SkipLayerNormalization" not in configured and "LayerNormalization" in configured
