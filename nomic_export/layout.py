"""Names of the files in an exported OUT directory, shared by exporter, runtime and publisher.

Torch-free: the runtime imports it.

    OUT/onnx/model.onnx (+ model.onnx_data)           variant "moe": com.nomic::MoE nodes, needs the op library
    OUT/onnx/model_ortmoe.onnx (+ .onnx_data)         variant "ortmoe": ORT's built-in com.microsoft::MoE
    OUT/onnx/model_dense.onnx (+ .onnx_data)          variant "dense": standard ONNX ops only
    OUT/custom_ops/<platform>/libnomic_moe_ops.so     the op library, copied in
    OUT/config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, (+ sentence-transformers files)
    OUT/export_report.json                            provenance and each variant's verification figures
    OUT/README.md                                     the model card
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from nomic_export.errors import UserError

VARIANTS = ("moe", "ortmoe", "dense")
DEFAULT_VARIANTS = ("moe",)

ONNX_DIR = "onnx"
CUSTOM_OPS_DIR = "custom_ops"
LIBRARY_NAME = "libnomic_moe_ops.so"
REPORT_NAME = "export_report.json"
MODEL_CARD_NAME = "README.md"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# sentence-transformers files copied when the source has them
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)

# ONNX Runtime session config entries that the runtime, verify and bench set on every variant, and that the
# model card tells other runtimes to set. ORT fuses each residual Add + LayerNormalization into
# com.microsoft::SkipLayerNormalization, whose CPU kernel took 228 ms of a 32x128 batch (24 nodes, ORT
# 1.32, 2 threads) where the unfused LayerNormalization + Add took 92 ms; keeping them apart was 0.6-5%
# faster end to end at 1 and 2 threads (benchmarks/README.md). The two are the same arithmetic up to float32
# summation order.
ORT_CONFIG_ENTRIES = {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"}

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")

# Model-family constants the runtime needs without reading the reference model.
MAX_TOKENS = 512
TASK_PREFIXES = {
    "search_query": "search_query: ",
    "search_document": "search_document: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
}


def inference_session(model: str | bytes, options, source: Path, providers=None):
    """``onnxruntime.InferenceSession`` on an exported graph; a graph ORT cannot load is a UserError naming ``source``.

    ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...) for a truncated weights file, a
    graph edited by hand or a missing op; the message keeps ORT's first line, which says which.
    """
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:
        if type(err).__module__ != "onnxruntime.capi.onnxruntime_pybind11_state":
            raise
        reason = str(err).strip().splitlines()[0]
        raise UserError(
            f"{source}: onnxruntime {ort.__version__} cannot load it ({reason}). An export that was copied or "
            "downloaded may be incomplete (export_report.json lists every file's size and sha256): copy or "
            "download it again, or export it again."
        ) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (the report, the model card): a temporary file beside it, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def variant_onnx_path(variant: str) -> str:
    """Relative path of a variant's graph inside OUT, e.g. ``onnx/model_dense.onnx``."""
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    stem = "model" if variant == "moe" else f"model_{variant}"
    return f"{ONNX_DIR}/{stem}.onnx"


def apply_ort_config(options) -> None:
    """Set ORT_CONFIG_ENTRIES on an ``onnxruntime.SessionOptions``."""
    for key, value in ORT_CONFIG_ENTRIES.items():
        options.add_session_config_entry(key, value)


def platform_tag() -> str:
    """The folder name under OUT/custom_ops/ for this machine's op library, e.g. ``linux-x86_64``."""
    return f"{sys.platform}-{platform.machine().lower()}".replace("linux2", "linux")
