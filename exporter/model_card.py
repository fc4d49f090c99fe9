"""The model card (OUT/README.md), rendered from export_report.json and the files in OUT.

Every figure in the card is read from the report at render time, never typed in: ``export`` renders it
right after writing the report, ``verify`` re-renders it after recording new figures, and ``publish``
re-renders it with the repository id so the loading snippets name the repository they are read in.

Torch-free (``publish`` imports it): json, pathlib and huggingface_hub only.

Benchmark contract (for ``nomic-export bench``): when export_report.json has a ``"benchmarks"`` key, it is a
list of rows, one dict per measured case, with the keys of ``BENCHMARK_COLUMNS``::

    {"contender": "moe", "batch": 1, "seq": 128, "threads": 2,
     "tokens_per_s": 1843.2, "p50_ms": 69.4, "p90_ms": 71.0, "ratio_to_moe": 1.0}

The card renders every row as a table, these columns first in this order, then any other keys the rows
carry (sorted); a missing value shows as "–". An optional ``"benchmark_info"`` string (machine, ORT
version, how it was run) is printed above the table. Without ``"benchmarks"`` the card says none was run.
After writing them, the bench command re-renders the card with ``render_model_card(report, out)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nomic_export import __version__
from nomic_export.layout import (
    CUSTOM_OPS_DIR,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    ORT_CONFIG_ENTRIES,
    TASK_PREFIXES,
    VARIANTS,
    variant_onnx_path,
)

DEFAULT_BASE_MODEL = "nomic-ai/nomic-embed-text-v2-moe"
# The license of nomic-ai/nomic-embed-text-v2-moe as its own model card states it. It applies only when
# the source says nothing (no README.md front matter with a license, locally or in the Hub cache).
DEFAULT_LICENSE = "apache-2.0"
REPO_ID_PLACEHOLDER = "OWNER/NAME"
# Read back by a later render (verify, bench) so a published card keeps naming its repository.
_REPO_ID_MARKER = re.compile(r"<!-- nomic-export repo_id: (\S+) -->")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MATRYOSHKA_MIN_DIM = 256  # nomic-embed-text-v2-moe was trained for truncation down to 256 features

BENCHMARK_COLUMNS = ("contender", "batch", "seq", "threads", "tokens_per_s", "p50_ms", "p90_ms", "ratio_to_moe")

# What each variant is, and what loads it (SPEC.md section 4).
VARIANT_TEXT = {
    "moe": (
        "`com.nomic::MoE` nodes: true top-2 sparse routing, exact erf GELU",
        "nomic-export's runtime; onnxruntime (Python, C/C++, Rust `ort`) with the op library registered",
    ),
    "ortmoe": (
        "ONNX Runtime's built-in `com.microsoft::MoE` (CPU kernel from ORT 1.23, float only); its GELU is the "
        "tanh approximation, so it is close but not exact",
        "any onnxruntime >= 1.23 with no extra library: Python, C/C++, Rust `ort`, fastembed",
    ),
    "dense": (
        "standard ONNX ops only: every expert runs on every token and the top-2 gate masks the result "
        "(exact, about 4x the FFN compute of the sparse variants)",
        "any ONNX runtime with opset 23 (onnxruntime >= 1.23)",
    ),
}


def render_model_card(report: dict, out: Path, repo_id: str | None = None, license: str | None = None) -> str:
    """Render OUT's model card from its export report.

    Args:
        report: the contents of OUT/export_report.json.
        out: the export directory (read for file sizes, op-library platforms, config.json and an existing card).
        repo_id: the Hub repository the card is published in; default the one an existing card names,
            else the placeholder ``OWNER/NAME``.
        license: the license id; default the source's README.md front matter, else the existing card's
            (the source may be gone by ``verify`` or ``publish``), else ``apache-2.0`` (the base model's).
    Returns:
        The card's text: YAML front matter, then Markdown.
    Example:
        >>> (out / "README.md").write_text(render_model_card(report, out))
    """
    out = Path(out)
    existing = _existing_card(out)
    repo_id = repo_id or existing.get("repo_id") or REPO_ID_PLACEHOLDER
    license = license or _source_license(report) or existing.get("license") or DEFAULT_LICENSE
    source = report.get("source", {})
    base_model = _base_model(source)
    config = _read_json(out / "config.json")
    hidden = int(config.get("n_embd", 768))
    small_dim = min(MATRYOSHKA_MIN_DIM, hidden)
    variants = [v for v in VARIANTS if v in report.get("variants", {})]
    platforms = _platforms(report, out)

    sections = [
        _front_matter(base_model, license),
        f"<!-- nomic-export repo_id: {repo_id} -->\n",
        f"# {base_model.split('/')[-1]} in ONNX, with sparse MoE routing\n",
        f"ONNX export of [{base_model}](https://huggingface.co/{base_model}) made by "
        f"nomic-export {report.get('versions', {}).get('nomic_export', __version__)}. "
        f"Every MoE layer routes each token to its top-{config.get('moe_top_k', 2)} of "
        f"{config.get('num_experts', 8)} experts at run time: the routing is computed "
        "in the graph, never frozen into constants by tracing. Every variant was checked against the "
        "PyTorch reference before this export was written (figures below).\n",
        _source_section(source, report),
        _variants_section(variants, report, out, platforms),
        _verification_section(variants, report),
        _benchmark_section(report),
        _usage_section(variants, platforms, repo_id, hidden, small_dim),
        _tasks_section(hidden, small_dim),
    ]
    return "\n".join(s for s in sections if s)


def _front_matter(base_model: str, license: str) -> str:
    lines = [
        "---",
        f"base_model: {base_model}",
        # A format conversion: the Hub's model tree has no "converted" relation, and "quantized" is the
        # relation it uses for same-weights repacks (GGUF, ONNX) of a base model.
        "base_model_relation: quantized",
        f"license: {license}",
        "library_name: onnx",
        "pipeline_tag: sentence-similarity",
        "tags:",
        *(f"- {t}" for t in ("onnx", "onnxruntime", "moe", "mixture-of-experts", "custom-op",
                             "sentence-embeddings", "matryoshka", "nomic-export")),
        "---",
    ]
    return "\n".join(lines) + "\n"


def _source_section(source: dict, report: dict) -> str:
    model = source.get("model") or "unknown"
    if source.get("local_path"):
        # a local directory's full path says nothing to a reader and may name a private home directory
        origin = f"a local checkpoint directory (`{Path(source['local_path']).name}`)"
    else:
        origin = f"[{model}](https://huggingface.co/{model})"
    rows = [
        ("source", origin),
        ("requested revision", f"`{source['revision']}`" if source.get("revision") else "default branch"),
        ("source commit", f"`{source['commit']}`" if source.get("commit") else "– (local source)"),
        ("exported", report.get("created", "–")),
    ]
    versions = report.get("versions", {})
    if versions:
        rows.append(("with", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return "## Source\n\n" + _table(("", ""), rows)


def _variants_section(variants: list[str], report: dict, out: Path, platforms: list[str]) -> str:
    rows = []
    for v in variants:
        onnx = report["variants"][v].get("file", variant_onnx_path(v))
        size = _size(out / onnx) + _size(out / (onnx + "_data"))
        what, loads = VARIANT_TEXT[v]
        rows.append((v, f"`{onnx}` (+ `{Path(onnx).name}_data`), {_mib(size)}", what, loads))
    text = "## Variants\n\n" + _table(("variant", "files", "what it is", "loads in"), rows)
    if "moe" in variants:
        if platforms:
            listed = ", ".join(f"`{CUSTOM_OPS_DIR}/{p}/{LIBRARY_NAME}`" for p in platforms)
            text += (
                f"\nThe `moe` variant needs the `com.nomic::MoE` operator library, included for these "
                f"platforms: {listed}. It links no onnxruntime library and loads in any onnxruntime "
                "from 1.21 on; the graphs (opset 23) need onnxruntime >= 1.23.\n"
            )
        else:
            text += "\nThe `moe` variant needs the `com.nomic::MoE` operator library; none is included here.\n"
    return text


def _verification_section(variants: list[str], report: dict) -> str:
    gates = report.get("gates", {})
    rows = []
    for v in variants:
        f = report["variants"][v].get("verification") or {}
        rows.append(
            (
                v,
                format_cosine(f.get("min_cosine")),
                format_error(f.get("max_abs_error")),
                format_error(f.get("rel_max_abs_error")),
                format_ratio(f.get("routing_agreement")),
                f"{f.get('tokens', '–')} / {f.get('texts', '–')}",
                "pass" if f.get("passed") else "**FAIL**",
            )
        )
    header = ("variant", "min cosine", "max abs error", "max abs / max abs(ref)", "routing agreement",
              "tokens / texts", "gates")
    text = (
        "## Verification\n\n"
        "Measured on a multilingual probe set (many scripts, 1 to over 512 tokens, padded batches of mixed "
        "lengths) against the PyTorch reference in fp32: the lowest sentence-embedding cosine, the largest absolute "
        "error of `last_hidden_state` over real tokens (and relative to the largest reference activation), "
        "and the share of tokens whose top-2 experts agree in every MoE layer.\n\n"
        + _table(header, rows)
    )
    if gates:
        text += "\nPass marks: " + ", ".join(f"`{k}` = {v}" for k, v in gates.items()) + ".\n"
    return text


def _benchmark_section(report: dict) -> str:
    rows = report.get("benchmarks")
    if not rows:
        return "## Benchmarks\n\nNo benchmark was run for this export.\n"
    extra = sorted({k for r in rows for k in r} - set(BENCHMARK_COLUMNS))
    columns = [c for c in BENCHMARK_COLUMNS if any(c in r for r in rows)] + extra
    table = _table(columns, [[format_number(r.get(c)) for c in columns] for r in rows])
    info = report.get("benchmark_info")
    return "## Benchmarks\n\n" + (f"{info}\n\n" if info else "") + table


def _usage_section(variants: list[str], platforms: list[str], repo_id: str, hidden: int, small_dim: int) -> str:
    platform = platforms[0] if platforms else "linux-x86_64"
    library = f"{CUSTOM_OPS_DIR}/{platform}/{LIBRARY_NAME}"
    parts = ["## Usage\n"]
    if repo_id == REPO_ID_PLACEHOLDER:
        parts.append(f"Replace `{REPO_ID_PLACEHOLDER}` with this repository's id.\n")
    runtime_variant = "moe" if "moe" in variants else (variants[0] if variants else "moe")
    parts.append(
        "### nomic-export's runtime (Python; onnxruntime, tokenizers, numpy; no torch)\n\n"
        "```python\n"
        "from nomic_export.runtime import MoETextEmbedding\n\n"
        f'model = MoETextEmbedding("{repo_id}", variant="{runtime_variant}")  # or a local export directory\n'
        'queries = list(model.query_embed(["What is the capital of France?"]))      # adds "search_query: "\n'
        'documents = list(model.passage_embed(["Paris is the capital of France."]))  # adds "search_document: "\n'
        f'small = list(model.embed(["A text to cluster."], task="clustering", dim={small_dim}))  # Matryoshka\n'
        "```\n"
    )
    if "moe" in variants:
        parts.append(
            "### onnxruntime in Python, with the operator library\n\n"
            "```python\n"
            "import numpy as np\n"
            "import onnxruntime as ort\n"
            "from huggingface_hub import snapshot_download\n"
            "from tokenizers import Tokenizer\n\n"
            f'path = snapshot_download(repo_id="{repo_id}")  # or a local export directory\n'
            "so = ort.SessionOptions()\n"
            f'so.register_custom_ops_library(f"{{path}}/{library}")\n'
            + "".join(f'so.add_session_config_entry("{k}", "{v}")  # faster on CPU, see below\n' for k, v in ORT_CONFIG_ENTRIES.items())
            + f'session = ort.InferenceSession(f"{{path}}/{variant_onnx_path("moe")}", so)\n\n'
            'tokenizer = Tokenizer.from_file(f"{path}/tokenizer.json")\n'
            "tokenizer.enable_truncation(max_length=512)\n"
            'tokenizer.enable_padding(pad_id=1, pad_token="<pad>")\n'
            'batch = tokenizer.encode_batch(["search_query: What is the capital of France?",\n'
            '                                "search_document: Paris is the capital of France."])\n'
            "input_ids = np.array([e.ids for e in batch], dtype=np.int64)\n"
            "attention_mask = np.array([e.attention_mask for e in batch], dtype=np.int64)\n"
            "(sentence_embedding,) = session.run(\n"
            '    ["sentence_embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})\n'
            f"# (batch, {hidden}): the masked mean of last_hidden_state over real tokens, L2-normalised\n"
            f"small = sentence_embedding[:, :{small_dim}]\n"
            "small /= np.linalg.norm(small, axis=1, keepdims=True)  # Matryoshka: truncate, then re-normalise\n"
            "```\n\n"
            "### Rust, `ort` 2.x\n\n"
            "```rust\n"
            "use ort::session::Session;\n\n"
            "let session = Session::builder()?\n"
            f'    .with_operator_library("{library}")?\n'
            f'    .commit_from_file("{variant_onnx_path("moe")}")?;\n'
            "```\n\n"
            "From C or C++, register the library with `RegisterCustomOpsLibrary_V2` on the session options.\n\n"
            + "Every variant ran up to 5% faster on CPU (0.6-5% across batch shapes) with the session config "
            + ", ".join(f"`{k}` = `{v}`" for k, v in ORT_CONFIG_ENTRIES.items())
            + " (Python `add_session_config_entry`, C `AddSessionConfigEntry`): ONNX Runtime's fused "
            "SkipLayerNormalization kernel is slower on this model than the LayerNormalization and Add it replaces. "
            "The runtime, `verify` and `bench` of nomic-export set it.\n"
        )
    if "ortmoe" in variants:
        onnx = variant_onnx_path("ortmoe")
        parts.append(
            "### fastembed, with the `ortmoe` variant (no operator library)\n\n"
            "fastembed cannot register an operator library, so it runs `ortmoe`, whose MoE is ONNX Runtime's "
            "own. fastembed mean-pools the graph's first output, `last_hidden_state`, over real tokens and "
            "normalises it, which gives the graph's own `sentence_embedding`. "
            "Add the task prefix yourself.\n\n"
            "```python\n"
            "from fastembed import TextEmbedding\n"
            "from fastembed.common.model_description import ModelSource, PoolingType\n\n"
            "TextEmbedding.add_custom_model(\n"
            f'    model="{repo_id}-ortmoe",\n'
            "    pooling=PoolingType.MEAN,\n"
            "    normalization=True,\n"
            f'    sources=ModelSource(hf="{repo_id}"),\n'
            f"    dim={hidden},\n"
            f'    model_file="{onnx}",\n'
            f'    additional_files=["{onnx}_data"],\n'
            ")\n"
            f'model = TextEmbedding(model_name="{repo_id}-ortmoe")\n'
            'embeddings = list(model.embed(["search_document: Paris is the capital of France."]))\n'
            "```\n"
        )
    return "\n".join(parts)


def _tasks_section(hidden: int, small_dim: int) -> str:
    prefixes = "\n".join(f"- `{p}`" for p in TASK_PREFIXES.values())
    return (
        "## Task prefixes and Matryoshka dimensions\n\n"
        "Every input starts with a task prefix (the trailing space included); queries and documents for "
        "retrieval take different ones:\n\n"
        f"{prefixes}\n\n"
        f"The sentence embedding has {hidden} features. For smaller vectors keep the first d of them (down to "
        f"{small_dim}) and L2-normalise again (Matryoshka): truncate the pooled vector, never the token "
        "sequence.\n"
    )


def format_cosine(x) -> str:
    return "–" if x is None else f"{x:.8f}"


def format_error(x) -> str:
    return "–" if x is None else f"{x:.3e}"


def format_ratio(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def format_number(x) -> str:
    """A benchmark cell: integers as they are, floats to a precision that suits their size, lists joined."""
    if x is None:
        return "–"
    if isinstance(x, (list, tuple)):
        return " / ".join(format_number(v) for v in x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _platforms(report: dict, out: Path) -> list[str]:
    """The op-library platforms actually in OUT (what is published), else those the report names."""
    ops = out / CUSTOM_OPS_DIR
    found = sorted(p.name for p in ops.iterdir() if (p / LIBRARY_NAME).is_file()) if ops.is_dir() else []
    return found or list(report.get("platforms", []))


def _base_model(source: dict) -> str:
    model = source.get("model") or ""
    return model if not source.get("local_path") and _HUB_ID.match(model) else DEFAULT_BASE_MODEL


def _source_license(report: dict) -> str | None:
    """The license in the source's README.md front matter: a local source's, or a Hub source's cached copy."""
    source = report.get("source", {})
    readme = None
    if source.get("local_path"):
        readme = Path(source["local_path"]) / MODEL_CARD_NAME
    elif source.get("model") and _HUB_ID.match(source["model"]):
        try:  # the cache only: rendering a card never touches the network
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source["model"], MODEL_CARD_NAME, revision=source.get("commit"))
            readme = Path(cached) if isinstance(cached, str) else None
        except Exception:
            readme = None
    return _front_matter_of(readme).get("license") if readme else None


def _existing_card(out: Path) -> dict:
    card = out / MODEL_CARD_NAME
    if not card.is_file():
        return {}
    found = {"license": _front_matter_of(card).get("license")}
    marker = _REPO_ID_MARKER.search(card.read_text(errors="replace"))
    if marker and marker.group(1) != REPO_ID_PLACEHOLDER:
        found["repo_id"] = marker.group(1)
    return found


def _front_matter_of(path: Path) -> dict:
    """A README's YAML front matter, read with huggingface_hub's own card parser; {} if none or unreadable."""
    if not path.is_file():
        return {}
    try:
        from huggingface_hub.repocard import metadata_load

        return metadata_load(path) or {}
    except Exception:
        return {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
