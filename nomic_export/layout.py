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


def variant_onnx_path(variant: str) -> str:
    """Relative path of a variant's graph inside OUT, e.g. ``onnx/model_dense.onnx``."""
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    stem = "model" if variant == "moe" else f"model_{variant}"
    return f"{ONNX_DIR}/{stem}.onnx"


def platform_tag() -> str:
    """The folder name under OUT/custom_ops/ for this machine's op library, e.g. ``linux-x86_64``."""
    return f"{sys.platform}-{platform.machine().lower()}".replace("linux2", "linux")
