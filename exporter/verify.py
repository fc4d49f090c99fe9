"""Verification of every exported variant against the PyTorch reference.

A built-in multilingual probe set runs through each variant in ONNX Runtime and through the reference model,
in padded batches of mixed lengths. Per variant: the minimum cosine of sentence embeddings, the maximum
absolute error of last_hidden_state over real tokens relative to max|h|, and the fraction of real tokens
whose top-k expert set agrees in every MoE layer. Failures are collected for every variant, then raised
as one error (optimum's export validation does the same); a tolerance failure is never a warning.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from nomic_export.errors import UserError, VerificationError
from nomic_export.exporter.gates import Gates
from nomic_export.exporter.checkpoint import load_model
from nomic_export.exporter.model import NomicMoEModel, pool
from nomic_export.layout import (
    CUSTOM_OPS_DIR,
    LIBRARY_NAME,
    MAX_TOKENS,
    VARIANTS,
    apply_ort_config,
    inference_session,
    platform_tag,
    variant_onnx_path,
)

log = logging.getLogger(__name__)

# The graph's metadata key listing, per MoE layer, the name of the value entering that layer's MoE.
MOE_INPUTS_KEY = "nomic_export.moe_inputs"


# Over 8 scripts, from one word to past 512 tokens (the last ones are truncated), with task prefixes.
PROBE_TEXTS = [
    "a",
    "Hello!",
    "search_query: What is the capital of France?",
    "search_document: Paris is the capital and largest city of France.",
    "search_document: ¡Hola! ¿Cómo estás? El modelo de lenguaje funciona bien.",
    "classification: Der schnelle braune Fuchs springt über den faulen Hund.",
    "clustering: Le modèle transforme une phrase en un vecteur de nombres.",
    "search_query: Что такое машинное обучение?",
    "search_document: Машинное обучение — это область искусственного интеллекта, которая изучает алгоритмы.",
    "search_query: 東京の人口はどれくらいですか？",
    "search_document: 東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "search_query: 什么是人工智能？",
    "search_document: 人工智能是计算机科学的一个分支，它试图理解智能的实质。",
    "search_query: 한국의 수도는 어디입니까?",
    "search_document: 서울은 대한민국의 수도이며 가장 큰 도시입니다.",
    "search_query: ما هي عاصمة مصر؟",
    "search_document: القاهرة هي عاصمة مصر وأكبر مدنها.",
    "search_query: מהי בירת ישראל?",
    "search_document: ירושלים היא עיר עתיקה.",
    "search_query: भारत की राजधानी क्या है?",
    "search_document: नई दिल्ली भारत की राजधानी है और एक बड़ा शहर है।",
    "search_query: Ποια είναι η πρωτεύουσα της Ελλάδας;",
    "search_document: Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "search_query: เมืองหลวงของประเทศไทยคืออะไร",
    "search_document: กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "classification: This movie was absolutely wonderful, I loved every minute of it.",
    "clustering: Quantum computing uses qubits that can be in superposition.",
    "search_document: Mixed scripts: English, Русский, 日本語, العربية, हिन्दी, 한국어, ไทย, Ελληνικά.",
    "search_query: 1234567890 !@#$%^&*()",
    "search_document: " + "The quick brown fox jumps over the lazy dog. " * 12,
    "search_document: " + "Машинное обучение и искусственный интеллект. " * 30,
    "search_document: " + " ".join(f"token{i} word{i % 7} 文字{i % 5}" for i in range(400)),
    "clustering: " + "日本語の長い文章をここに書きます。" * 60,
]
PROBE_BATCH_SIZE = 8  # probe texts stay in their listed order, so each batch mixes lengths


def probe_batches(tokenizer_path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The probe set tokenized with OUT's tokenizer: (input_ids, attention_mask) int64 batches, right-padded."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_truncation(MAX_TOKENS)
    pad_id = tok.token_to_id("<pad>")
    batches = []
    for start in range(0, len(PROBE_TEXTS), PROBE_BATCH_SIZE):
        encodings = tok.encode_batch(PROBE_TEXTS[start : start + PROBE_BATCH_SIZE])
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        batches.append((ids, mask))
    return batches


def _routing(x: np.ndarray, router_weight: np.ndarray, top_k: int) -> np.ndarray:
    """The sorted top-k expert ids of each token of x [..., H] -> [T, k]; fp32 routing as the op does."""
    logits = x.reshape(-1, x.shape[-1]).astype(np.float32) @ router_weight.astype(np.float32).T
    return np.sort(np.argsort(-logits, axis=-1, kind="stable")[:, :top_k], axis=-1)


@dataclasses.dataclass
class Reference:
    """The reference's outputs on the probe batches, and what is needed to route ONNX hidden states alike."""

    hidden: list[np.ndarray]  # per batch (B, S, H)
    embeddings: list[np.ndarray]  # per batch (B, H)
    routes: list[list[np.ndarray]]  # per batch, per MoE layer: (B*S, k)
    routers: list[np.ndarray]  # per MoE layer: (E, H)
    top_k: int


def run_reference(model: NomicMoEModel, batches) -> Reference:
    moe_layers = [block.mlp for block in model.encoder.layers if hasattr(block.mlp, "router")]
    captured: list[np.ndarray] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: captured.append(args[0].numpy())) for m in moe_layers]
    routers = [m.router.layer.weight.numpy().copy() for m in moe_layers]
    ref = Reference([], [], [], routers, model.config.top_k)
    try:
        with torch.no_grad():
            for ids, mask in batches:
                captured.clear()
                ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
                h = model(ids_t, mask_t)
                ref.hidden.append(h.numpy())
                ref.embeddings.append(pool(h, mask_t).numpy())
                ref.routes.append([_routing(x, r, ref.top_k) for x, r in zip(captured, routers)])
    finally:
        for hook in hooks:
            hook.remove()
    return ref


def open_session(out: Path, variant: str, extra_outputs: bool = False):
    """An ORT session for a variant in OUT; with ``extra_outputs``, it also returns each MoE layer's input."""
    import onnxruntime as ort

    path = out / variant_onnx_path(variant)
    options = ort.SessionOptions()
    apply_ort_config(options)  # the graph the runtime runs is the graph verified
    if variant == "moe":
        library = out / CUSTOM_OPS_DIR / platform_tag() / LIBRARY_NAME  # OUT's own copy, the one it ships
        if not library.is_file():
            raise UserError(f"{library}: missing; the moe variant needs the op library. Re-export, or run build-ops.")
        options.register_custom_ops_library(str(library))
    if not extra_outputs:
        return inference_session(str(path), options, path), []
    # Verification runs each graph once per probe batch: pre-packed weight copies (about the weights' size
    # again for the dense variant) would cost memory, not time. The same MLAS kernels run either way.
    options.add_session_config_entry("session.disable_prepacking", "1")
    model = onnx.load(str(path), load_external_data=False)
    names = json.loads({p.key: p.value for p in model.metadata_props}[MOE_INPUTS_KEY])
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    # From bytes, ORT finds external data in the folder this session option names.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    session = inference_session(model.SerializeToString(), options, path)
    return session, names


def verify_variant(out: Path, variant: str, batches, ref: Reference) -> dict:
    """Run one variant on the probe batches and compare with the reference."""
    session, _ = open_session(out, variant, extra_outputs=True)
    min_cos, max_err, agree, tokens = 1.0, 0.0, 0, 0
    scale = max(float(np.abs(h[m.astype(bool)]).max()) for h, (_, m) in zip(ref.hidden, batches))
    from tqdm.auto import tqdm

    progress = tqdm(total=len(batches), desc=f"verify {variant}", unit="batch", leave=False,
                    disable=not log.isEnabledFor(logging.INFO))
    for (ids, mask), h_ref, e_ref, routes_ref in zip(batches, ref.hidden, ref.embeddings, ref.routes):
        progress.update()
        outputs = session.run(None, {"input_ids": ids, "attention_mask": mask})
        h, e = outputs[0], outputs[1]
        real = mask.astype(bool)
        cos = (e * e_ref).sum(-1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(e_ref, axis=-1))
        min_cos = min(min_cos, float(cos.min()))
        max_err = max(max_err, float(np.abs(h - h_ref)[real].max()))
        same = np.ones(real.size, dtype=bool)
        for x, router, r_ref in zip(outputs[2:], ref.routers, routes_ref):
            same &= (_routing(x, router, ref.top_k) == r_ref).all(axis=-1)
        agree += int(same[real.reshape(-1)].sum())
        tokens += int(real.sum())
    progress.close()
    return {
        "min_cosine": min_cos,
        "max_abs_error": max_err,
        "rel_max_abs_error": max_err / scale,
        "routing_agreement": agree / tokens,
        "tokens": tokens,
        "texts": sum(len(ids) for ids, _ in batches),
    }


def check_gates(variant: str, figures: dict, gates: Gates) -> list[str]:
    """The gates a variant's figures miss, as sentences."""
    failures = []
    min_cos = gates.min_cosine_ortmoe if variant == "ortmoe" else gates.min_cosine
    if figures["min_cosine"] < min_cos:
        failures.append(f"{variant}: min cosine {figures['min_cosine']:.7f} < {min_cos}")
    if variant != "ortmoe" and figures["rel_max_abs_error"] > gates.max_rel_abs:
        failures.append(f"{variant}: relative max-abs error {figures['rel_max_abs_error']:.2e} > {gates.max_rel_abs:g}")
    return failures


def format_table(results: dict[str, dict]) -> str:
    lines = [
        f"{'variant':<8} {'min cosine':>11} {'rel max-abs':>12} {'routing agree':>14} {'tokens':>7}  gates",
        "-" * 66,
    ]
    for variant, r in results.items():
        lines.append(
            f"{variant:<8} {r['min_cosine']:>11.7f} {r['rel_max_abs_error']:>12.2e} "
            f"{r['routing_agreement']:>14.5f} {r['tokens']:>7}  {'pass' if r['passed'] else 'FAIL'}"
        )
    return "\n".join(lines)


def variants_in(out: Path) -> list[str]:
    return [v for v in VARIANTS if (out / variant_onnx_path(v)).is_file()]


def verify(out: str | Path, checkpoint: Path, gates: Gates = Gates(), variants: list[str] | None = None) -> dict:
    """Verify the variants of an export directory against the PyTorch reference; returns per-variant figures.

    The reference runs first and is released before any ONNX Runtime session opens, so the two models are
    never in memory together (peak RSS stays near one model's size plus one session's).

    Args:
        out: an export directory (or the temporary one an export is writing).
        checkpoint: the checkpoint directory the export was made from.
        gates: the pass marks.
        variants: which to check; default every variant present.
    Returns:
        ``{variant: {min_cosine, rel_max_abs_error, routing_agreement, ..., passed, failures}}``.
    Raises:
        VerificationError: after checking every variant, if any missed a gate.
    Example:
        >>> verify("out", resolve_checkpoint("nomic-ai/nomic-embed-text-v2-moe"))
    """
    out = Path(out)
    variants = variants or variants_in(out)
    if not variants:
        raise UserError(f"{out}: no exported variant found under onnx/; is this an export directory?")
    batches = probe_batches(out / "tokenizer.json")
    log.info("verify: reference model on %d probe texts", len(PROBE_TEXTS))
    ref = run_reference(load_model(checkpoint), batches)
    gc.collect()
    results, failures = {}, []
    for variant in variants:
        log.info("verify: %s", variant)
        figures = verify_variant(out, variant, batches, ref)
        gc.collect()  # this variant's session, before the next one opens
        figures["failures"] = check_gates(variant, figures, gates)
        figures["passed"] = not figures["failures"]
        failures += figures["failures"]
        results[variant] = figures
    table = format_table(results)
    if failures:
        raise VerificationError(table + "\n" + "\n".join(failures) + "\nThe export does not compute the model.", results)
    return results

