"""One-node ONNX models of the MoE FFN: the ``com.nomic::MoE`` node, and the same MoE in standard ops.

Used by the op's tests (STYLE.md rule 7: torch reference, standard-ops graph, custom node) and by
``benchmarks/bench_moe_op.py``. Torch-free; imports onnx only.

Every model takes inputs ``X`` [N, H], ``router_weight`` [E, H], ``w1`` [E, F, H], ``w2`` [E, F, H]
and optionally ``bias`` [H], and returns ``Y`` [N, H]. Weights are graph inputs unless ``initializers``
gives them, in which case they become initializers (as in an exported model).
"""

from __future__ import annotations

import math

import numpy as np

from nomic_export.custom_ops import (
    ATTR_ACTIVATION,
    ATTR_NORMALIZE,
    ATTR_TOP_K,
    DOMAIN,
    OP_TYPE,
    OP_VERSION,
)

_ONNX_OPSET = 18


def _io(dtype, tokens, hidden, experts, ffn, bias, initializers):
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    dims = {"X": [tokens, hidden], "router_weight": [experts, hidden], "w1": [experts, ffn, hidden],
            "w2": [experts, ffn, hidden], "bias": [hidden]}
    names = ["X", "router_weight", "w1", "w2"] + (["bias"] if bias else [])
    inits = [numpy_helper.from_array(np.asarray(initializers[n], dtype=dtype), n) for n in names if initializers and n in initializers]
    init_names = {t.name for t in inits}
    inputs = [helper.make_tensor_value_info(n, elem, dims[n]) for n in names if n not in init_names]
    output = helper.make_tensor_value_info("Y", elem, [tokens, hidden])
    return elem, inputs, output, inits


def moe_node_model(
    hidden: int,
    ffn: int,
    experts: int,
    top_k: int = 2,
    activation: str = "gelu",
    normalize: int = 0,
    bias: bool = True,
    dtype=np.float32,
    tokens: int | str = "N",
    initializers: dict | None = None,
):
    """A model with one ``com.nomic::MoE`` node; without ``bias`` its fifth input is "" (absent)."""
    from onnx import helper

    _, inputs, output, inits = _io(dtype, tokens, hidden, experts, ffn, bias, initializers)
    node = helper.make_node(
        OP_TYPE, ["X", "router_weight", "w1", "w2", "bias" if bias else ""], ["Y"], domain=DOMAIN,
        **{ATTR_TOP_K: top_k, ATTR_ACTIVATION: activation, ATTR_NORMALIZE: normalize},
    )
    graph = helper.make_graph([node], "nomic_moe", inputs, [output], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET), helper.make_opsetid(DOMAIN, OP_VERSION)])


def dense_moe_model(
    hidden: int,
    ffn: int,
    experts: int,
    top_k: int = 2,
    activation: str = "gelu",
    normalize: int = 0,
    bias: bool = True,
    dtype=np.float32,
    tokens: int | str = "N",
    initializers: dict | None = None,
):
    """The same MoE in standard ONNX ops: every expert on every token, masked by the top-k gate.

    Routing runs in fp32 (Cast) as the op's contract says; the experts run in ``dtype``.
    """
    from onnx import TensorProto, helper

    elem, inputs, output, inits = _io(dtype, tokens, hidden, experts, ffn, bias, initializers)
    f32 = TensorProto.FLOAT
    c = lambda name, value, t=f32: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, t, [len(value)] if isinstance(value, list) else [], value if isinstance(value, list) else [value]))
    nodes = [
        c("zero", 0.0),
        c("k", [top_k], TensorProto.INT64),
        c("axes0", [0], TensorProto.INT64),
        c("axes_last", [-1], TensorProto.INT64),
        # routing in fp32: p = softmax(x r^T) (N, E); gate (N, E) = top-k values scattered, 0 elsewhere
        helper.make_node("Cast", ["X"], ["x32"], to=f32),
        helper.make_node("Cast", ["router_weight"], ["r32"], to=f32),
        helper.make_node("Gemm", ["x32", "r32"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("TopK", ["probs", "k"], ["top_w", "top_i"], axis=-1),
    ]
    if normalize:
        nodes += [
            helper.make_node("ReduceSum", ["top_w", "axes_last"], ["top_sum"], keepdims=1),
            helper.make_node("Div", ["top_w", "top_sum"], ["top_w_n"]),
        ]
    nodes += [
        helper.make_node("Mul", ["probs", "zero"], ["zeros"]),
        helper.make_node("ScatterElements", ["zeros", "top_i", "top_w_n" if normalize else "top_w"], ["gate32"], axis=1),
        helper.make_node("Cast", ["gate32"], ["gate"], to=elem),
        # experts, all of them: (1, N, H) x (E, H, F) -> (E, N, F) -> act -> x (E, F, H) -> (E, N, H)
        helper.make_node("Unsqueeze", ["X", "axes0"], ["x1"]),
        helper.make_node("Transpose", ["w1"], ["w1t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x1", "w1t"], ["h"]),
    ]
    if activation == "gelu":  # 0.5 h (1 + erf(h / sqrt 2))
        nodes += [
            c("half", 0.5, elem), c("one", 1.0, elem), c("inv_sqrt2", 1 / math.sqrt(2), elem),
            helper.make_node("Mul", ["h", "inv_sqrt2"], ["hs"]),
            helper.make_node("Erf", ["hs"], ["erf"]),
            helper.make_node("Add", ["erf", "one"], ["erf1"]),
            helper.make_node("Mul", ["h", "erf1"], ["herf"]),
            helper.make_node("Mul", ["herf", "half"], ["a"]),
        ]
    elif activation == "gelu_tanh":  # 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
        nodes += [
            c("half", 0.5, elem), c("one", 1.0, elem), c("c3", 0.044715, elem), c("s2pi", math.sqrt(2 / math.pi), elem),
            helper.make_node("Mul", ["h", "h"], ["h2"]),
            helper.make_node("Mul", ["h2", "h"], ["h3"]),
            helper.make_node("Mul", ["h3", "c3"], ["h3c"]),
            helper.make_node("Add", ["h", "h3c"], ["inner"]),
            helper.make_node("Mul", ["inner", "s2pi"], ["inner2"]),
            helper.make_node("Tanh", ["inner2"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["t1"]),
            helper.make_node("Mul", ["h", "t1"], ["ht"]),
            helper.make_node("Mul", ["ht", "half"], ["a"]),
        ]
    elif activation == "silu":
        nodes += [helper.make_node("Sigmoid", ["h"], ["sig"]), helper.make_node("Mul", ["h", "sig"], ["a"])]
    else:
        raise ValueError(f"unknown activation {activation!r}")
    nodes += [
        helper.make_node("MatMul", ["a", "w2"], ["ye"]),  # (E, N, H)
        helper.make_node("Transpose", ["gate"], ["gate_t"], perm=[1, 0]),  # (E, N)
        helper.make_node("Unsqueeze", ["gate_t", "axes_last"], ["gate3"]),  # (E, N, 1)
        helper.make_node("Mul", ["ye", "gate3"], ["yg"]),
        helper.make_node("ReduceSum", ["yg", "axes0"], ["y_sum" if bias else "Y"], keepdims=0),
    ]
    if bias:
        nodes.append(helper.make_node("Add", ["y_sum", "bias"], ["Y"]))
    graph = helper.make_graph(nodes, "dense_moe", inputs, [output], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET)])


def ort_moe_model(hidden: int, ffn: int, experts: int, top_k: int = 2, tokens: int | str = "N", initializers: dict | None = None):
    """ORT's built-in ``com.microsoft::MoE`` (CPU from ORT 1.23, float only) on the same weights.

    Mapping (SPEC.md section 4): router logits computed here (the op applies softmax itself);
    fc1 [E, F, H] = w1; fc2 [E, H, F] = w2 transposed; the shared bias added after the op. Its "gelu"
    is the tanh approximation, so it matches ``activation="gelu_tanh"``, not the model's exact GELU.
    """
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    inits = []
    inputs = [helper.make_tensor_value_info("X", f32, [tokens, hidden])]
    if initializers:
        inits = [
            numpy_helper.from_array(np.asarray(initializers["router_weight"], np.float32), "router_weight"),
            numpy_helper.from_array(np.ascontiguousarray(initializers["w1"], np.float32), "fc1"),
            numpy_helper.from_array(np.ascontiguousarray(np.swapaxes(initializers["w2"], 1, 2), np.float32), "fc2"),
            numpy_helper.from_array(np.asarray(initializers["bias"], np.float32), "bias"),
        ]
    else:
        inputs += [
            helper.make_tensor_value_info("router_weight", f32, [experts, hidden]),
            helper.make_tensor_value_info("fc1", f32, [experts, ffn, hidden]),
            helper.make_tensor_value_info("fc2", f32, [experts, hidden, ffn]),
            helper.make_tensor_value_info("bias", f32, [hidden]),
        ]
    nodes = [
        helper.make_node("Gemm", ["X", "router_weight"], ["logits"], transB=1),
        helper.make_node("MoE", ["X", "logits", "fc1", "", "fc2"], ["y_moe"], domain="com.microsoft",
                         k=top_k, activation_type="gelu", normalize_routing_weights=0),
        helper.make_node("Add", ["y_moe", "bias"], ["Y"]),
    ]
    graph = helper.make_graph(nodes, "ort_moe", inputs, [helper.make_tensor_value_info("Y", f32, [tokens, hidden])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET), helper.make_opsetid("com.microsoft", 1)])
