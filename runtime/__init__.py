"""A torch-free embedder for exported artifacts: ``MoETextEmbedding``, shaped like fastembed's ``TextEmbedding``.

Example:
    >>> from nomic_export.runtime import MoETextEmbedding
    >>> model = MoETextEmbedding("out")                      # an export directory, or a Hub id
    >>> vectors = list(model.embed(["Hello!"], task="search_document", dim=256))
"""

from nomic_export.runtime.embedding import Batch, EmbedStats, MoETextEmbedding

__all__ = ["Batch", "EmbedStats", "MoETextEmbedding"]
