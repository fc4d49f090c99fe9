"""``nomic-export bench``: every variant of an export and the PyTorch reference, side by side in one run.

For each thread count, every contender is loaded, warmed up, then run in interleaved rounds
(A B C A B C ...) so machine drift hits all alike; medians are quoted. Beside them, in the same run:
ORT MatMul's GFLOP/s on the FFN GEMM shape (the roof), the model's active FLOPs per token, the ``moe``
variant's share of that roof, and at batch 1 a weight-streaming floor (bytes of weights a query touches
divided by the bandwidth of ORT MatMul streaming distinct weights).

Session-creation time and peak RSS are measured in a fresh subprocess per contender, so one contender's
memory never counts against another's.

Row keys (also the model card's benchmark contract, exporter/model_card.py): contender, batch, seq,
threads, tokens_per_s, p50_ms, p90_ms, ratio_to_moe = contender tokens/s / moe tokens/s (below 1: moe
is faster; moe's speed-up over a contender is its reciprocal); and moe_speedup_rounds = [min, median, max]
over rounds of the contender's time / moe's time in the same round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nomic_export.errors import UserError
from nomic_export.layout import REPORT_NAME, apply_ort_config, inference_session, variant_onnx_path, write_text_atomic

log = logging.getLogger(__name__)

TORCH = "torch"  # the PyTorch reference's contender name
WARMUP = 2


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    layers: int
    ffn: int
    experts: int
    top_k: int
    vocab: int

    @classmethod
    def from_config(cls, path: Path) -> ModelShape:
        c = json.loads(path.read_text())
        return cls(c["n_embd"], c["n_head"], c["n_layer"], c["n_inner"] or 4 * c["n_embd"], c["num_experts"], c["moe_top_k"], c["vocab_size"])

    def moe_layers(self) -> int:
        return sum(1 for i in range(self.layers) if i % 2 == 1)

    def active_flops_per_token(self, seq: int) -> float:
        """Multiply-adds x 2 per token: projections, attention over ``seq`` keys, FFNs, router, top-k experts."""
        H, F = self.hidden, self.ffn
        attention = 2 * (4 * H * H) + 2 * 2 * seq * H  # Wqkv + out_proj; q.k and p.v
        dense = 2 * 2 * H * F
        moe = 2 * H * self.experts + self.top_k * 2 * 2 * H * F
        n_moe = self.moe_layers()
        return self.layers * attention + (self.layers - n_moe) * dense + n_moe * moe

    def weight_bytes_touched(self, experts_used: int) -> int:
        """fp32 bytes a forward pass reads from weights, with ``experts_used`` experts per MoE layer."""
        H, F = self.hidden, self.ffn
        per_layer = 4 * H * H + 4 * H + 4 * H  # attention weights and biases, two LayerNorms (approx.)
        dense = 2 * H * F + F + H
        moe = self.experts * H + min(experts_used, self.experts) * 2 * F * H + H
        n_moe = self.moe_layers()
        return 4 * (self.layers * per_layer + (self.layers - n_moe) * dense + n_moe * moe)


# ------------------------------------------------------------------------------------------- contenders


def ort_session(out: Path, variant: str, threads: int):
    """The runtime's session settings (nomic_export.runtime), with idle spinning off so that the interleaved
    contenders do not steal each other's two cores between runs."""
    import onnxruntime as ort

    from nomic_export.runtime.embedding import find_op_library

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    apply_ort_config(options)
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if variant == "moe":
        options.register_custom_ops_library(str(find_op_library(out)))
    graph = out / variant_onnx_path(variant)
    session = inference_session(str(graph), options, graph)
    return lambda ids, mask: session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})


def torch_runner(model, threads: int):
    import torch

    torch.set_num_threads(threads)

    def run(ids, mask):
        with torch.no_grad():
            return model(torch.from_numpy(ids), torch.from_numpy(mask))

    return run


def _child(kind: str, path: str, variant: str, threads: int, batch: int, seq: int) -> None:
    """Run in a fresh process: load one contender, run one batch, print its load time and peak RSS."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if kind == TORCH:
        from nomic_export.exporter.checkpoint import load_model, resolve_checkpoint

        run = torch_runner(load_model(resolve_checkpoint(path)), threads)
    else:
        run = ort_session(Path(path), variant, threads)
    created = time.perf_counter() - start
    ids = rng.integers(4, 1000, (batch, seq)).astype(np.int64)  # every vocabulary, tiny included, has 1000 ids
    run(ids, np.ones_like(ids))
    print(json.dumps({"session_s": created, "peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss, which Linux carries over from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status; peak RSS is measured on Linux only")


def measure_in_child(kind: str, path: str | Path, variant: str, threads: int, batch: int, seq: int) -> dict:
    code = "import sys; from nomic_export.exporter.bench import _child; _child(*sys.argv[1:3], sys.argv[3], *map(int, sys.argv[4:]))"
    args = [sys.executable, "-c", code, kind, str(path), variant, str(threads), str(batch), str(seq)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {kind}/{variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ roofline


def matmul_gflops(tokens: int, hidden: int, ffn: int, threads: int, reps: int = 5) -> float:
    """ORT MatMul GFLOP/s on [tokens, hidden] x [hidden, ffn], the FFN's GEMM shape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((hidden, ffn), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "roof",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", ffn])],
        initializer=[w],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 2 * tokens * hidden * ffn / statistics.median(times[1:]) / 1e9


def streaming_bandwidth(hidden: int, ffn: int, threads: int, total_bytes: int = 512 << 20) -> float:
    """Bytes/s of a plain weight-streaming loop on ORT's thread pool: ReduceSum over distinct weight-sized
    initializers (each read once from memory, nothing packed or written back)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    count = max(2, total_bytes // (hidden * ffn * 4))
    rng = np.random.default_rng(1)
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")  # rows: contiguous per thread
    inits, nodes = [axes], []
    for i in range(count):
        inits.append(numpy_helper.from_array(rng.standard_normal((ffn, hidden), dtype=np.float32), f"w{i}"))
        nodes.append(helper.make_node("ReduceSum", [f"w{i}", "axes"], [f"y{i}"], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "stream",
        [],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [ffn]) for i in range(count)],
        initializer=inits,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no constant folding
    session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), options, providers=["CPUExecutionProvider"])
    times = []
    for _ in range(4):
        start = time.perf_counter()
        session.run(None, {})
        times.append(time.perf_counter() - start)
    return count * hidden * ffn * 4 / statistics.median(times[1:])


# ------------------------------------------------------------------------------------------------ run


def bench(
    out: str | Path,
    batches=(1, 8, 32),
    seqs=(16, 128, 512),
    threads=(1, 2),
    torch_reference: str | None = None,
    rounds: int = 5,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> dict:
    """Measure every variant in OUT (and the PyTorch reference when given) and return the results.

    Args:
        out: an export directory.
        batches, seqs, threads: the grid; each (batch, seq) runs at each thread count.
        torch_reference: a checkpoint (Hub id or directory) for the PyTorch reference contender.
        rounds: interleaved timed rounds per case, after warm-up.
        json_path, plot_path: where to write the results and the plot.
    Returns:
        ``{"rows": [...], "roofline": [...], "floor": {...}, "contenders": {...}, "info": str}``; also stored
        under "benchmarks" in OUT/export_report.json and rendered into the model card.
    Example:
        >>> bench("out", batches=(1, 32), seqs=(16, 128), threads=(2,), torch_reference="ckpt")
    """
    from nomic_export.exporter.verify import variants_in

    out = Path(out)
    variants = variants_in(out)
    if not variants:
        raise UserError(f"{out}: no exported variant under onnx/; run `nomic-export export MODEL -o {out}` first.")
    if "moe" not in variants:
        raise UserError(f"{out}: has no moe variant, which the ratios are taken against; export with --variants moe,...")
    # Refuse bad arguments before measuring anything: a full-size run takes many minutes.
    if rounds < 1:
        raise UserError(f"--rounds {rounds}: at least one timed round is needed; pass --rounds 1 or more.")
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None and not Path(path).parent.is_dir():
            raise UserError(f"{flag} {path}: folder {Path(path).parent} does not exist; create it or choose another path.")
    if plot_path is not None:
        _check_plot_format(Path(plot_path))
    if torch_reference:
        from nomic_export.exporter.checkpoint import check_checkpoint, resolve_checkpoint

        torch_reference = resolve_checkpoint(torch_reference)
        check_checkpoint(torch_reference)
    shape = ModelShape.from_config(out / "config.json")
    contenders = list(variants) + ([TORCH] if torch_reference else [])
    rows, roof, contender_info, floor = [], [], {}, {}
    biggest = (max(batches), max(seqs))

    for t in threads:
        for name in contenders:
            log.info("bench: %s, %d thread(s): session creation and peak RSS (subprocess)", name, t)
            kind, path = (TORCH, torch_reference) if name == TORCH else ("ort", out)
            contender_info[f"{name}/{t}"] = measure_in_child(kind, path, name, t, *biggest)
        runners = {v: ort_session(out, v, t) for v in variants}
        reference = None
        if torch_reference:
            from nomic_export.exporter.checkpoint import load_model

            reference = load_model(torch_reference)
            runners[TORCH] = torch_runner(reference, t)
        for batch in batches:
            for seq in seqs:
                rng = np.random.default_rng(batch * 1000 + seq)
                ids = rng.integers(4, min(shape.vocab, 250000) - 1, (batch, seq)).astype(np.int64)
                ids[:, 0], ids[:, -1] = 0, 2
                mask = np.ones_like(ids)
                times = {name: [] for name in runners}
                for _ in range(WARMUP):
                    for run in runners.values():
                        run(ids, mask)
                for _ in range(rounds):
                    for name, run in runners.items():
                        start = time.perf_counter()
                        run(ids, mask)
                        times[name].append(time.perf_counter() - start)
                moe_p50 = statistics.median(times["moe"])
                for name, ts in times.items():
                    p50 = statistics.median(ts)
                    # each round's contender time over moe's time in the same round: the pairs ran seconds
                    # apart, so their ratios show how far the machine's drift moves the comparison
                    paired = [c / m for c, m in zip(ts, times["moe"])]
                    rows.append(
                        {
                            "contender": name,
                            "batch": batch,
                            "seq": seq,
                            "threads": t,
                            "tokens_per_s": batch * seq / p50,
                            "p50_ms": 1e3 * p50,
                            "p90_ms": 1e3 * float(np.percentile(ts, 90)),
                            "ratio_to_moe": moe_p50 / p50,
                            "moe_speedup_rounds": [min(paired), statistics.median(paired), max(paired)],
                        }
                    )
                gflops = matmul_gflops(batch * seq, shape.hidden, shape.ffn, t)
                active = shape.active_flops_per_token(seq)
                roof.append(
                    {
                        "batch": batch,
                        "seq": seq,
                        "threads": t,
                        "matmul_gflops": gflops,
                        "active_gflop_per_token": active / 1e9,
                        "moe_share_of_roof": active * batch * seq / moe_p50 / 1e9 / gflops,
                    }
                )
                log.info("bench: batch %d x %d, %d thread(s): %s", batch, seq, t, _summary(rows[-len(times):]))
        if 1 in batches:
            bandwidth = streaming_bandwidth(shape.hidden, shape.ffn, t)
            touched = shape.weight_bytes_touched(experts_used=min(shape.experts, 2 * min(seqs)))
            floor[str(t)] = {
                "stream_gb_per_s": bandwidth / 1e9,
                "weight_bytes_touched": touched,
                "floor_ms": 1e3 * touched / bandwidth,
                "seq": min(seqs),
                "moe_p50_ms": next(r["p50_ms"] for r in rows if r["contender"] == "moe" and r["batch"] == 1 and r["seq"] == min(seqs) and r["threads"] == t),
            }
        del runners, reference

    import onnxruntime

    info = (
        f"{platform.processor() or platform.machine()}, {_cpu_name()}, onnxruntime {onnxruntime.__version__}, "
        f"{rounds} interleaved rounds after {WARMUP} warm-up, medians; ORT idle spinning off"
    )
    results = {"rows": rows, "roofline": roof, "floor": floor, "contenders": contender_info, "info": info,
               "weights_mb": (out / (variant_onnx_path("moe") + "_data")).stat().st_size / 2**20,
               "date": time.strftime("%Y-%m-%d")}
    if json_path:
        write_text_atomic(Path(json_path), json.dumps(results, indent=2) + "\n")
    if plot_path:
        plot(results, Path(plot_path))
    _record_in_report(out, results)
    return results


def _summary(rows: list[dict]) -> str:
    return ", ".join(f"{r['contender']} {r['p50_ms']:.1f} ms" for r in rows)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _record_in_report(out: Path, results: dict) -> None:
    from nomic_export.exporter.export import write_report
    from nomic_export.exporter.model_card import render_model_card
    from nomic_export.layout import MODEL_CARD_NAME

    path = out / REPORT_NAME
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["benchmarks"] = results["rows"]
    report["benchmark_info"] = results["info"]
    write_report(out, report)
    write_text_atomic(out / MODEL_CARD_NAME, render_model_card(report, out))


def format_tables(results: dict) -> str:
    lines = [
        f"{'contender':<9} {'batch':>5} {'seq':>5} {'thr':>3} {'tokens/s':>10} {'p50 ms':>9} {'p90 ms':>9} {'moe speed-up':>13}"
        f"  {'per round: min / median / max':>30}"
    ]
    for r in results["rows"]:
        lines.append(
            f"{r['contender']:<9} {r['batch']:>5} {r['seq']:>5} {r['threads']:>3} {r['tokens_per_s']:>10.0f} "
            f"{r['p50_ms']:>9.1f} {r['p90_ms']:>9.1f} {1 / r['ratio_to_moe']:>12.2f}x"
            f"  {' / '.join(f'{x:.2f}x' for x in r['moe_speedup_rounds']):>30}"
        )
    lines += ["", f"{'batch':>5} {'seq':>5} {'thr':>3} {'MatMul GFLOP/s':>15} {'GFLOP/token':>12} {'moe share of roof':>18}"]
    for r in results["roofline"]:
        lines.append(
            f"{r['batch']:>5} {r['seq']:>5} {r['threads']:>3} {r['matmul_gflops']:>15.0f} "
            f"{r['active_gflop_per_token']:>12.3f} {100 * r['moe_share_of_roof']:>17.0f}%"
        )
    for t, f in results["floor"].items():
        lines.append(
            f"\nbatch 1 x {f['seq']}, {t} thread(s): weight-streaming floor {f['floor_ms']:.1f} ms "
            f"({f['weight_bytes_touched'] / 1e9:.2f} GB at {f['stream_gb_per_s']:.1f} GB/s); moe {f['moe_p50_ms']:.1f} ms "
            f"({f['floor_ms'] / f['moe_p50_ms']:.0%} of the floor's speed)"
        )
    lines.append("")
    lines.append(f"{'contender/threads':<18} {'session s':>10} {'peak RSS MB':>12}   (weights {results['weights_mb']:.0f} MB)")
    for name, c in results["contenders"].items():
        lines.append(f"{name:<18} {c['session_s']:>10.2f} {c['peak_rss_mb']:>12.0f}")
    lines.append(results["info"])
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'nomic-export[bench]'") from None
    return plt


def _check_plot_format(path: Path) -> None:
    """Refuse a --plot file whose suffix matplotlib cannot write, before the run rather than after it."""
    plt = _pyplot()
    fig = plt.figure()
    formats = fig.canvas.get_supported_filetypes()
    plt.close(fig)
    if path.suffix.lower().lstrip(".") not in formats:
        raise UserError(
            f"--plot {path}: matplotlib cannot write {path.suffix or 'a file without a suffix'}; "
            f"end the name in one of {', '.join('.' + f for f in sorted(formats))} (e.g. bench.png)."
        )


def plot(results: dict, path: Path) -> None:
    """tokens/s per batch shape, one line per contender (one panel per thread count)."""
    plt = _pyplot()
    threads = sorted({r["threads"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False)
    for ax, t in zip(axes[0], threads):
        rows = [r for r in results["rows"] if r["threads"] == t]
        shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in rows))
        for name in dict.fromkeys(r["contender"] for r in rows):
            tps = {(r["batch"], r["seq"]): r["tokens_per_s"] for r in rows if r["contender"] == name}
            ax.plot(range(len(shapes)), [tps[s] for s in shapes], marker="o", label=name)
        ax.set_xticks(range(len(shapes)), [f"{b}x{s}" for b, s in shapes], rotation=45)
        ax.set_xlabel("batch x sequence")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{t} thread(s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("nomic-embed-text-v2-moe, fp32: throughput per contender")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
