"""fastembed interop: the ortmoe variant (standard ops plus ORT's built-in com.microsoft::MoE, no op library)
loads through fastembed's ``TextEmbedding.add_custom_model`` from a local path and gives our vectors.

fastembed exposes no way to register an op library (SPEC.md section 4), which is why ``ortmoe`` exists.
fastembed pools in numpy (float64 mean, then normalise) where our graph pools in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest

from nomic_export.layout import MAX_TOKENS
from nomic_export.runtime import MoETextEmbedding

fastembed = pytest.importorskip(
    "fastembed",
    reason="fastembed cannot be installed here (it is in the test extra: pip install -e '.[test]')",
)

# fp32 graph vs fastembed's float64 numpy pooling of the same last_hidden_state: the bound, 1e-3,
# is far above the ~1e-7 actually seen; it allows fastembed to change its pooling arithmetic.
FASTEMBED_ATOL = 1e-3
# The exact call the README documents, with the dim of the tiny model (768 for the real one).
MODEL_NAME = "nomic-export/tiny-ortmoe-test"
TEXTS = ["search_query: Hello!", "", "search_document: ¡Hola! ¿Cómo estás?", "token " * (2 * MAX_TOKENS), "東京"]


def test_ortmoe_through_fastembed_add_custom_model(tiny_export, monkeypatch):
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network: the files come from tiny_export
    ours = MoETextEmbedding(tiny_export, variant="ortmoe", threads=1)
    if MODEL_NAME not in {m["model"] for m in TextEmbedding.list_supported_models()}:
        TextEmbedding.add_custom_model(
            model=MODEL_NAME,
            pooling=PoolingType.MEAN,
            normalization=True,
            sources=ModelSource(hf="nomic-ai/nomic-embed-text-v2-moe"),  # never fetched: specific_model_path wins
            dim=ours.hidden_size,
            model_file="onnx/model_ortmoe.onnx",
            additional_files=["onnx/model_ortmoe.onnx_data"],
        )
    theirs = TextEmbedding(MODEL_NAME, specific_model_path=str(tiny_export), threads=1)
    got = np.stack(list(theirs.embed(TEXTS, batch_size=2)))
    expected = np.stack(list(ours.embed(TEXTS)))
    assert got.shape == expected.shape == (len(TEXTS), ours.hidden_size)
    np.testing.assert_allclose(got, expected, atol=FASTEMBED_ATOL, rtol=0)
