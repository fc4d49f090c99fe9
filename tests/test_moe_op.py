"""com.nomic::MoE in ONNX Runtime against a numpy reference, a torch reference and a standard-ops graph.

The library comes from ``nomic_export.custom_ops.build()`` (cached), or from ``$NOMIC_EXPORT_MOE_LIBRARY``
when set: that is how the AddressSanitizer run points these tests at the ASan build (custom_ops/README.md).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from nomic_export import custom_ops
from nomic_export.custom_ops import graphs

# Tolerances, relative to max|Y| of the reference (the accuracy targets).
# fp32: the kernel sums H and F products in fp32 in another order than the fp64 reference.
FP32_REL_TOL = 1e-5
# fp16: inputs and output rounded to fp16 (relative step 2^-11), accumulation in fp32.
FP16_REL_TOL = 1e-2
# Routing comparisons skip tokens whose k-th and (k+1)-th probabilities are closer than this: fp32 and
# fp64 may legitimately pick different experts there.
ROUTING_TIE_GAP = 1e-5
RANDOM_CASES = 220


@pytest.fixture(scope="module")
def library() -> str:
    return os.environ.get(custom_ops.ENV_LIBRARY) or custom_ops.build()


def session(library: str, model, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_weights(rng, tokens, hidden, ffn, experts, bias=True, dtype=np.float32, x_shape=None):
    scale_in, scale_out = 1 / math.sqrt(hidden), 1 / math.sqrt(ffn)
    feeds = {
        "X": rng.standard_normal(x_shape or (tokens, hidden)),
        "router_weight": rng.standard_normal((experts, hidden)) * scale_in * 2,
        "w1": rng.standard_normal((experts, ffn, hidden)) * scale_in,
        "w2": rng.standard_normal((experts, ffn, hidden)) * scale_out,
    }
    if bias:
        feeds["bias"] = rng.standard_normal(hidden) * 0.1
    return {name: value.astype(dtype) for name, value in feeds.items()}


def reference(feeds, top_k, activation="gelu", normalize=0):
    """fp64 numpy: every expert on every token, masked by the top-k gate. Returns (Y, tokens to compare)."""
    x = feeds["X"].astype(np.float64).reshape(-1, feeds["X"].shape[-1])  # (N, H)
    logits = x @ feeds["router_weight"].astype(np.float64).T  # (N, E)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    chosen = order[:, :top_k]  # (N, k)
    gate = np.zeros_like(p)
    np.put_along_axis(gate, chosen, np.take_along_axis(p, chosen, -1), -1)
    if normalize:
        gate /= gate.sum(-1, keepdims=True)
    sorted_p = np.take_along_axis(p, order, -1)
    clear = np.ones(len(x), bool) if top_k == p.shape[1] else (sorted_p[:, top_k - 1] - sorted_p[:, top_k]) > ROUTING_TIE_GAP
    h = np.einsum("nh,efh->nef", x, feeds["w1"].astype(np.float64))  # (N, E, F)
    if activation == "gelu":
        erf = np.vectorize(math.erf, otypes=[np.float64])
        a = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    elif activation == "gelu_tanh":
        a = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    else:
        a = h / (1 + np.exp(-h))
    y = np.einsum("ne,nef,efh->nh", gate, a, feeds["w2"].astype(np.float64))
    if "bias" in feeds:
        y = y + feeds["bias"].astype(np.float64)
    return y.reshape(feeds["X"].shape), clear


def assert_close(actual, expected, rel_tol, rows=None, what=""):
    actual = actual.astype(np.float64).reshape(-1, actual.shape[-1])
    expected = expected.astype(np.float64).reshape(-1, expected.shape[-1])
    if rows is not None:
        actual, expected = actual[rows], expected[rows]
    if expected.size == 0:
        return
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max())
    assert err <= rel_tol * scale, f"{what}: max-abs error {err:.3g} > {rel_tol:g} x max|Y| ({scale:.3g})"


def test_random_cases_match_reference(library):
    """>= 200 random shapes, k, activations, biases, ranks; a few large N. Also the ASan run's test."""
    rng = np.random.default_rng(20240607)
    sessions = {}
    for case in range(RANDOM_CASES):
        experts = int(rng.integers(1, 17))
        top_k = int(rng.integers(1, experts + 1))
        hidden = int(rng.integers(0, 24)) * 2 + 1  # odd H and F
        ffn = int(rng.integers(0, 24)) * 2 + 1
        tokens = int(rng.choice([0, 1, 2, 3, 7, 16, 31, 64, 100, 257])) if case % 40 else int(rng.integers(1000, 4501))
        activation = str(rng.choice(custom_ops.ACTIVATIONS))
        normalize = int(rng.integers(0, 2))
        bias = bool(rng.integers(0, 2))
        rank = int(rng.integers(2, 5))
        if rank == 2 or tokens == 0:
            x_shape = (tokens, hidden) if rank == 2 else (2, tokens, hidden)
        else:
            x_shape = (1,) * (rank - 2) + (tokens, hidden)
        key = (hidden, ffn, experts, top_k, activation, normalize, bias, len(x_shape))
        if key not in sessions:
            model = graphs.moe_node_model(hidden, ffn, experts, top_k, activation, normalize, bias, tokens="N")
            # the model declares X as (N, H); other ranks need a free-rank X
            model.graph.input[0].type.tensor_type.ClearField("shape")
            model.graph.output[0].type.tensor_type.ClearField("shape")
            sessions[key] = session(library, model)
        feeds = random_weights(rng, tokens, hidden, ffn, experts, bias, x_shape=x_shape)
        (y,) = sessions[key].run(None, feeds)
        assert y.shape == tuple(x_shape), f"case {case}: Y {y.shape} for X {x_shape}"
        expected, clear = reference(feeds, top_k, activation, normalize)
        assert_close(y, expected, FP32_REL_TOL, clear, f"case {case} {key} N={tokens}")


@pytest.mark.parametrize("activation", custom_ops.ACTIVATIONS)
@pytest.mark.parametrize("normalize", [0, 1])
def test_matches_standard_ops_graph(library, activation, normalize):
    rng = np.random.default_rng(1)
    feeds = random_weights(rng, 200, 48, 96, 8)
    (y_op,) = session(library, graphs.moe_node_model(48, 96, 8, 2, activation, normalize)).run(None, feeds)
    (y_dense,) = session(library, graphs.dense_moe_model(48, 96, 8, 2, activation, normalize)).run(None, feeds)
    expected, clear = reference(feeds, 2, activation, normalize)
    assert_close(y_op, y_dense, FP32_REL_TOL, clear, "custom node vs standard-ops graph")
    assert_close(y_op, expected, FP32_REL_TOL, clear, "custom node vs numpy")


def test_matches_torch_top2_loop(library):
    """The third way (STYLE.md rule 7): a torch loop over tokens' top-2 experts, as upstream writes it."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    feeds = random_weights(rng, 64, 40, 72, 8)
    (y_op,) = session(library, graphs.moe_node_model(40, 72, 8, 2)).run(None, feeds)
    t = {name: torch.from_numpy(value).double() for name, value in feeds.items()}
    p = torch.softmax(t["X"] @ t["router_weight"].T, dim=-1)
    weights, experts = p.topk(2, dim=-1)
    y = torch.zeros_like(t["X"])
    for e in range(8):
        token, slot = torch.where(experts == e)
        h = torch.nn.functional.gelu(t["X"][token] @ t["w1"][e].T) @ t["w2"][e]
        y.index_add_(0, token, weights[token, slot, None] * h)
    assert_close(y_op, (y + t["bias"]).numpy(), FP32_REL_TOL, what="custom node vs torch loop")


def test_float16_matches_float32(library):
    rng = np.random.default_rng(3)
    feeds32 = random_weights(rng, 300, 64, 128, 8)
    feeds16 = {name: value.astype(np.float16) for name, value in feeds32.items()}
    (y32,) = session(library, graphs.moe_node_model(64, 128, 8)).run(None, {n: v.astype(np.float32) for n, v in feeds16.items()})
    (y16,) = session(library, graphs.moe_node_model(64, 128, 8, dtype=np.float16)).run(None, feeds16)
    assert y16.dtype == np.float16
    assert_close(y16, y32, FP16_REL_TOL, what="fp16 vs fp32 on the same fp16-rounded inputs")


def test_weights_as_initializers_rank3_input(library):
    """The exporter's form: X (B, S, H), weights as initializers."""
    rng = np.random.default_rng(4)
    feeds = random_weights(rng, 0, 24, 40, 4, x_shape=(3, 5, 24))
    model = graphs.moe_node_model(24, 40, 4, initializers={n: v for n, v in feeds.items() if n != "X"})
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", 24]))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    (y,) = session(library, model).run(None, {"X": feeds["X"]})
    assert_close(y, reference(feeds, 2)[0], FP32_REL_TOL, what="initializers, rank 3")


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (0, 0, 16)])
def test_zero_tokens_give_empty_output(library, shape):
    rng = np.random.default_rng(5)
    feeds = random_weights(rng, 0, 16, 8, 4, x_shape=shape)
    model = graphs.moe_node_model(16, 8, 4)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    (y,) = session(library, model).run(None, feeds)
    assert y.shape == shape and y.dtype == np.float32


def test_blocked_products_and_several_waves(library):
    """H and F span several K blocks with ragged ends; N spans two waves; an expert gets several chunks."""
    rng = np.random.default_rng(7)
    feeds = random_weights(rng, 2300, 200, 300, 4)
    (y,) = session(library, graphs.moe_node_model(200, 300, 4)).run(None, feeds)
    expected, clear = reference(feeds, 2)
    assert_close(y, expected, FP32_REL_TOL, clear, "H=200, F=300, N=2300")


def test_portable_kernels_match_reference(library):
    """CPUs without AVX-512 run the portable tiles: the reference cases again, forced onto them."""
    if os.environ.get("NOMIC_MOE_KERNEL") == "portable":
        pytest.skip("already running on the portable kernels")
    cases = "test_random_cases_match_reference or test_blocked_products_and_several_waves or test_matches_torch_top2_loop"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", cases],
        env={**os.environ, "NOMIC_MOE_KERNEL": "portable"}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(library, threads):
    rng = np.random.default_rng(6)
    feeds = random_weights(rng, 513, 64, 96, 8)
    (y,) = session(library, graphs.moe_node_model(64, 96, 8), threads=threads).run(None, feeds)
    expected, clear = reference(feeds, 2)
    assert_close(y, expected, FP32_REL_TOL, clear, f"{threads} threads")


# ---- bad input: a clear ORT error naming the input and its shape, never a crash ----

H, F, E = 16, 24, 4


def _static(overrides=None, **attrs):
    """A model with static shapes; overrides replace an input's declared shape or element type."""
    model = graphs.moe_node_model(H, F, E, tokens=5, **attrs)
    for name, dims in (overrides or {}).items():
        value = next(v for v in model.graph.input if v.name == name)
        if isinstance(dims, int):
            value.type.tensor_type.elem_type = dims
        else:
            value.type.tensor_type.shape.Clear()
            for d in dims:
                value.type.tensor_type.shape.dim.add().dim_value = d
    return model


SHAPE_ERRORS = {
    "x_rank_1": ({"X": [H]}, "'X' [16]"),
    "router_h": ({"router_weight": [E, H + 1]}, "'router_weight' [4, 17]"),
    "router_rank": ({"router_weight": [E, H, 1]}, "'router_weight' [4, 16, 1]"),
    "w1_h": ({"w1": [E, F, H - 1]}, "'w1' [4, 24, 15]"),
    "w1_e": ({"w1": [E + 1, F, H]}, "'w1' [5, 24, 16]"),
    "w2_transposed": ({"w2": [E, H, F]}, "'w2' [4, 16, 24]"),
    "bias_h": ({"bias": [H + 2]}, "'bias' [18]"),
    "router_fp16": ({"router_weight": 10}, "'router_weight' has element type float16"),
    "w1_double": ({"w1": 11}, "'w1' has element type float64"),
}


@pytest.mark.parametrize("case", sorted(SHAPE_ERRORS))
def test_bad_static_shapes_fail_at_session_creation(library, case):
    overrides, message = SHAPE_ERRORS[case]
    with pytest.raises(Exception, match="com.nomic::MoE") as info:
        session(library, _static(overrides))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"top_k": 0}, "'top_k' is 0"),
        ({"top_k": E + 1}, "'top_k' is 5 but there are only E = 4"),
        ({"activation": "relu"}, "'activation' is 'relu'"),
        ({"normalize": 2}, "'normalize_routing_weights' is 2"),
    ],
)
def test_bad_attributes_fail_at_session_creation(library, attrs, message):
    with pytest.raises(Exception, match="com.nomic::MoE") as info:
        session(library, _static(**attrs))
    assert message in str(info.value)


def test_bad_dynamic_shapes_fail_at_run(library):
    """Shapes unknown in the graph: the same checks run when the shapes arrive, naming the input."""
    model = graphs.moe_node_model(H, F, E, tokens=5)
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.ClearField("shape")
    sess = session(library, model)
    feeds = random_weights(np.random.default_rng(7), 5, H, F, E)
    sess.run(None, feeds)  # good shapes run
    bad = dict(feeds, w2=np.ascontiguousarray(feeds["w2"].transpose(0, 2, 1)))
    with pytest.raises(Exception, match=r"input 3 'w2' \[4, 16, 24\]"):
        sess.run(None, bad)
    with pytest.raises(Exception, match=r"'X' \[16\] must have rank >= 2"):
        sess.run(None, dict(feeds, X=feeds["X"][0]))
    small = dict(feeds, router_weight=feeds["router_weight"][:1], w1=feeds["w1"][:1], w2=feeds["w2"][:1])
    with pytest.raises(Exception, match=r"'top_k' is 2 but there are only E = 1"):
        sess.run(None, small)
