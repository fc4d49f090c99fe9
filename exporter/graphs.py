"""Building the three ONNX graph variants of the model.

Why this route: the model is exported once with ``torch.onnx.export(dynamo=True)``, whose
``custom_translation_table`` maps the opaque custom op ``nomic::moe`` to one ``com.nomic::MoE`` node. The
routing is never traced (it lives inside the op), so nothing input-specific is baked in (trap 12), and
the dynamo exporter keeps batch and sequence dynamic and writes parameters as initializers. This is the
exporter torch supports going forward (the TorchScript one is deprecated), and the translation table is
its documented extension point, so it holds across torch versions better than patching modules.
The ``ortmoe`` and ``dense`` variants are then derived from that graph by replacing each MoE node with the
equivalent subgraph of ``nomic_export.custom_ops.graphs`` (the same builders the op's own tests use), so
all three variants share every other node exactly and each variant stores its weights once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from nomic_export import custom_ops
from nomic_export.custom_ops import graphs as moe_graphs
from nomic_export.exporter.model import NomicMoEModel, pool
from nomic_export.exporter.verify import MOE_INPUTS_KEY
from nomic_export.layout import INPUT_NAMES, OUTPUT_NAMES

DEFAULT_OPSET = 23  # the first opset with RotaryEmbedding (exporter/model.py: rope); ORT >= 1.23 runs it
MAX_SEQUENCE = 2048  # RoPE is computed in the graph for any length up to max_trained_positions
ORT_MOE_DOMAIN = "com.microsoft"


class EmbeddingGraph(torch.nn.Module):
    """What the ONNX graph computes: last_hidden_state and the masked-mean, L2-normalised sentence embedding."""

    def __init__(self, model: NomicMoEModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        h = self.model(input_ids, attention_mask)
        return h, pool(h, attention_mask)


def _register_moe_schema() -> None:
    """onnxscript builds nodes from registered schemas, so declare com.nomic::MoE to onnx (once per process)."""
    if onnx.defs.has(custom_ops.OP_TYPE, custom_ops.OP_VERSION, custom_ops.DOMAIN):
        return
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    names = custom_ops.INPUT_NAMES
    schema = onnx.defs.OpSchema(
        custom_ops.OP_TYPE,
        custom_ops.DOMAIN,
        custom_ops.OP_VERSION,
        doc="Mixture-of-Experts FFN with top-k routing; see custom_ops/README.md.",
        inputs=[P(n, "T") for n in names[:-1]] + [P(names[-1], "T", param_option=optional)],
        outputs=[P(custom_ops.OUTPUT_NAMES[0], "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
        attributes=[
            A(custom_ops.ATTR_TOP_K, onnx.defs.OpSchema.AttrType.INT, "experts per token", required=False),
            A(custom_ops.ATTR_ACTIVATION, onnx.defs.OpSchema.AttrType.STRING, "gelu|gelu_tanh|silu", required=False),
            A(custom_ops.ATTR_NORMALIZE, onnx.defs.OpSchema.AttrType.INT, "renormalise top-k", required=False),
        ],
    )
    onnx.defs.register_schema(schema)


def _moe_to_onnx(x, router_weight, w1, w2, bias, top_k: int, activation: str, normalize_routing_weights: bool):
    """Translation of ``nomic::moe`` (exporter/model.py) to one ``com.nomic::MoE`` node."""
    import onnxscript

    op = onnxscript.values.Opset(custom_ops.DOMAIN, custom_ops.OP_VERSION)
    return getattr(op, custom_ops.OP_TYPE)(
        x,
        router_weight,
        w1,
        w2,
        bias,
        **{
            custom_ops.ATTR_TOP_K: top_k,
            custom_ops.ATTR_ACTIVATION: activation,
            custom_ops.ATTR_NORMALIZE: int(normalize_routing_weights),
        },
    )


def export_moe_graph(model: NomicMoEModel, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Export the model with com.nomic::MoE nodes to ``path`` (+ ``<name>_data`` beside it)."""
    import onnx_ir

    _register_moe_schema()
    ids = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 16, 2], [0, 20, 21, 22, 2, 1, 1, 1, 1]])
    mask = (ids != 1).long()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=MAX_SEQUENCE)
    # torch.onnx logs warnings about optional torchvision ops at registration; they are not about this model.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad():
        program = torch.onnx.export(
            EmbeddingGraph(model).eval(),
            (ids, mask),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            custom_translation_table={torch.ops.nomic.moe.default: _moe_to_onnx},
            optimize=True,
            verbose=False,
        )
    program.model.graph.name = "nomic_embed_text_v2_moe"
    # Verification reads each MoE layer's input to compare routing; record those values' names.
    moe_inputs = [n.inputs[0].name for n in program.model.graph if n.domain == custom_ops.DOMAIN]
    program.model.metadata_props[MOE_INPUTS_KEY] = json.dumps(moe_inputs)
    onnx_ir.save(program.model, path, external_data=path.name + "_data")


def export_checkpoint(checkpoint: str, path: str, opset: int = DEFAULT_OPSET) -> None:
    """Load a checkpoint directory and export its com.nomic::MoE graph (run in a child process by export())."""
    from nomic_export.exporter.checkpoint import load_model

    export_moe_graph(load_model(checkpoint), Path(path), opset=opset)


# ------------------------------------------------------------------------------- derived variants


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _inline(sub: onnx.ModelProto, prefix: str, bindings: dict[str, str]) -> list[onnx.NodeProto]:
    """The nodes of a one-MoE model, internal names prefixed, its inputs/output renamed to ``bindings``."""
    nodes = []
    for i, node in enumerate(sub.graph.node):
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{prefix}{i}_{node.op_type}"
        for field in (new.input, new.output):
            for i, name in enumerate(field):
                if name:
                    field[i] = bindings.get(name, prefix + name)
        nodes.append(new)
    return nodes


def derive_variant(moe_path: Path, variant: str, out_path: Path) -> None:
    """Write ``variant`` ("ortmoe" or "dense") of the com.nomic::MoE graph at ``moe_path`` to ``out_path``."""
    model = onnx.load(str(moe_path), load_external_data=True)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not (node.domain == custom_ops.DOMAIN and node.op_type == custom_ops.OP_TYPE):
            new_nodes.append(node)
            continue
        x, router, w1, w2, bias = (list(node.input) + [""] * 5)[:5]
        E, F, H = inits[w1].dims
        top_k = _attr(node, custom_ops.ATTR_TOP_K, custom_ops.DEFAULT_TOP_K)
        activation = _attr(node, custom_ops.ATTR_ACTIVATION, custom_ops.DEFAULT_ACTIVATION)
        normalize = _attr(node, custom_ops.ATTR_NORMALIZE, custom_ops.DEFAULT_NORMALIZE)
        bindings = {"X": x, "router_weight": router, "w1": w1, "w2": w2, "bias": bias, "Y": node.output[0]}
        prefix = f"{node.name or node.output[0]}/{variant}/"
        if variant == "dense":
            sub = moe_graphs.dense_moe_model(H, F, E, top_k, activation, normalize, bias=bool(bias))
        elif variant == "ortmoe":
            if normalize or activation != "gelu":
                raise ValueError(f"ortmoe maps only gelu without renormalisation, not {activation!r}/{normalize}")
            # com.microsoft::MoE wants fc2 as [E, H, F]: store the transposed w2 instead of w2 (once).
            w2_t = numpy_helper.to_array(inits[w2]).transpose(0, 2, 1)
            fc2 = numpy_helper.from_array(np.ascontiguousarray(w2_t), w2 + ".ehf")
            graph.initializer.remove(inits.pop(w2))
            graph.initializer.append(fc2)
            bindings |= {"fc1": w1, "fc2": fc2.name}
            sub = moe_graphs.ort_moe_model(H, F, E, top_k)
        else:
            raise ValueError(f"no derived variant {variant!r}")
        new_nodes += _inline(sub, prefix, bindings)
    del graph.node[:]
    graph.node.extend(new_nodes)
    domains = {o.domain: o.version for o in model.opset_import}
    domains.pop(custom_ops.DOMAIN, None)
    if variant == "ortmoe":
        domains[ORT_MOE_DOMAIN] = 1
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in domains.items())
    onnx.save(
        model,
        str(out_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=out_path.name + "_data",
        size_threshold=256,
    )
    # onnx creates external data files with mode 0600; give the data the graph file's permissions, so that
    # whoever may read the graph may read its weights (a service user, a shared model folder).
    data_path = out_path.with_name(out_path.name + "_data")
    data_path.chmod(out_path.stat().st_mode & 0o777)
