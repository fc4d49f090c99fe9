"""nomic-export: nomic-embed-text-v2-moe in ONNX Runtime with true top-2 sparse routing.

Parts: ``nomic_export.exporter`` (checkpoint loading, PyTorch reference, ONNX export, verification),
``nomic_export.custom_ops`` (the ``com.nomic::MoE`` ONNX Runtime operator) and
``nomic_export.runtime`` (a torch-free embedder for exported artifacts).
This module imports nothing heavy, so the runtime stays torch-free.
"""

from nomic_export.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
