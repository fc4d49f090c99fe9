"""Time com.nomic::MoE against ORT's com.microsoft::MoE, a torch loop, a dense graph and the GEMM roofline.

    python benchmarks/bench_moe_op.py                       # full dims, N in 1 16 128 512 2048, 1 and 2 threads
    python benchmarks/bench_moe_op.py --tokens 16 512 --threads 2 --reps 5     # a quicker run

Columns (median ms per call over interleaved runs, same fp32 weights):
  (a) com.nomic::MoE   (b) com.microsoft::MoE (tanh GELU, its only GELU)   (c) torch eager top-2 loop
  (d) dense all-experts masked standard-ops graph   (e) ORT MatMul on the routed GEMMs: [2N,H]x[H,F], [2N,F]x[F,H]
Ratios: b/a, c/a, d/a (> 1 means (a) is faster) and a's GFLOP/s as a share of e's. Accuracy: (a) vs (c)
max-abs / max|Y| in fp32, and fp16 (a) vs fp32 (a) on the same fp16-rounded inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Interleaving runs of five thread pools on two cores: an idle pool that spins steals the cores from the
# next one. Torch's OpenMP threads sleep when idle, and so do ORT's (allow_spinning 0, set below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper

from nomic_export import custom_ops
from nomic_export.custom_ops import graphs


def make_weights(hidden, ffn, experts, seed=0):
    rng = np.random.default_rng(seed)
    return {
        # router scaled so that logits are O(1): routing spreads over experts as in the real model
        "router_weight": (rng.standard_normal((experts, hidden)) / np.sqrt(hidden) * 2).astype(np.float32),
        "w1": (rng.standard_normal((experts, ffn, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "w2": (rng.standard_normal((experts, ffn, hidden)) / np.sqrt(ffn)).astype(np.float32),
        "bias": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
    }


def session(model, threads, library=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def roofline_model(rows, hidden, ffn, weights):
    """Two plain MatMuls with the routed work's shapes: (2N, H) x (H, F), then (2N, F) x (F, H)."""
    b1 = numpy_helper.from_array(np.ascontiguousarray(weights["w1"][0].T), "b1")  # (H, F)
    b2 = numpy_helper.from_array(np.ascontiguousarray(weights["w2"][0]), "b2")  # (F, H)
    nodes = [helper.make_node("MatMul", ["A", "b1"], ["h"]), helper.make_node("MatMul", ["h", "b2"], ["Y"])]
    graph = helper.make_graph(
        nodes, "roofline", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, hidden])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, hidden])], initializer=[b1, b2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def torch_top2_loop(x, w, top_k):
    """The upstream shape of the computation: route, then loop over experts on their gathered tokens."""
    probs = torch.softmax(x @ w["router_weight"].T, dim=-1)  # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k)
    y = torch.zeros_like(x)
    for e in range(w["w1"].shape[0]):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = torch.nn.functional.gelu(x.index_select(0, token) @ w["w1"][e].T) @ w["w2"][e]  # (n_e, H)
        y.index_add_(0, token, h * weights[token, slot, None])
    return y + w["bias"]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=7, help="interleaved runs per cell (after one warm-up)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args(argv)
    H, F, E, K = args.hidden, args.ffn, args.experts, args.top_k

    library = custom_ops.build()
    weights = make_weights(H, F, E)
    tw = {name: torch.from_numpy(value) for name, value in weights.items()}
    rng = np.random.default_rng(1)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, H={H} F={F} E={E} k={K}, fp32, "
          f"median of {args.reps} interleaved runs", flush=True)
    header = (f"{'thr':>3} {'N':>5} | {'(a) nomic':>9} {'(b) ortMoE':>10} {'(c) torch':>9} {'(d) dense':>9} {'(e) GEMM':>8} "
              f"| {'b/a':>5} {'c/a':>5} {'d/a':>5} | {'a GF/s':>6} {'e GF/s':>6} {'a/e':>5} | {'err a~c':>8}")
    rows = []
    failures = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        sessions = {
            "a": session(graphs.moe_node_model(H, F, E, K, initializers=weights), threads, library),
            "b": session(graphs.ort_moe_model(H, F, E, K, initializers=weights), threads),
            "d": session(graphs.dense_moe_model(H, F, E, K, initializers=weights), threads),
        }
        for tokens in args.tokens:
            x = rng.standard_normal((tokens, H)).astype(np.float32)
            roof = session(roofline_model(K * tokens, H, F, weights), threads)
            a_rows = np.ascontiguousarray(np.resize(x, (K * tokens, H)))
            calls = {
                "a": lambda: sessions["a"].run(None, {"X": x})[0],
                "b": lambda: sessions["b"].run(None, {"X": x})[0],
                "c": lambda: torch_top2_loop(torch.from_numpy(x), tw, K).numpy(),
                "d": lambda: sessions["d"].run(None, {"X": x})[0],
                "e": lambda: roof.run(None, {"A": a_rows})[0],
            }
            times = {name: [] for name in calls}
            outputs = {name: call() for name, call in calls.items()}  # warm-up
            with torch.inference_mode():
                for _ in range(args.reps):
                    for name, call in calls.items():
                        times[name].append(timed(call)[0])
            med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
            flops = 4.0 * K * tokens * H * F
            gf_a, gf_e = flops / med["a"] / 1e6, flops / med["e"] / 1e6
            scale = float(np.abs(outputs["c"]).max())
            err = float(np.abs(outputs["a"] - outputs["c"]).max()) / scale
            if err > 1e-5:
                failures.append(f"N={tokens} threads={threads}: (a) vs (c) max-abs {err:.2e} x max|Y| > 1e-5")
            row = (f"{threads:>3} {tokens:>5} | {med['a']:>9.2f} {med['b']:>10.2f} {med['c']:>9.2f} {med['d']:>9.2f} "
                   f"{med['e']:>8.2f} | {med['b'] / med['a']:>5.2f} {med['c'] / med['a']:>5.2f} {med['d'] / med['a']:>5.2f} "
                   f"| {gf_a:>6.0f} {gf_e:>6.0f} {gf_a / gf_e:>5.0%} | {err:>8.1e}")
            rows.append(row)
            print(row, flush=True)
        del sessions

    # fp16 accuracy: fp16 (a) against fp32 (a) on the same fp16-rounded inputs
    w16 = {name: value.astype(np.float16) for name, value in weights.items()}
    x16 = rng.standard_normal((512, H)).astype(np.float16)
    y16 = session(graphs.moe_node_model(H, F, E, K, dtype=np.float16, initializers=w16), 2, library).run(None, {"X": x16})[0]
    w32 = {name: value.astype(np.float32) for name, value in w16.items()}
    y32 = session(graphs.moe_node_model(H, F, E, K, initializers=w32), 2, library).run(None, {"X": x16.astype(np.float32)})[0]
    err16 = float(np.abs(y16.astype(np.float32) - y32).max()) / float(np.abs(y32).max())
    if err16 > 1e-2:
        failures.append(f"fp16 vs fp32 max-abs {err16:.2e} x max|Y| > 1e-2")

    print("\nms per call, median; ratios > 1: (a) is faster; a/e: (a)'s GFLOP/s as a share of the roofline's")
    print(header)
    for row in rows:
        print(row)
    print(f"fp16 (a) vs fp32 (a), N=512: max-abs {err16:.1e} x max|Y|")
    for failure in failures:
        print(f"ACCURACY FAILURE: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
