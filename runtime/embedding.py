"""A torch-free embedder for exported OUT directories, shaped like fastembed's ``TextEmbedding``.

Imports only onnxruntime, tokenizers, numpy (huggingface_hub lazily, to download) and the torch-free parts of
nomic_export (STYLE.md rule 10; ``tests/test_runtime.py`` runs it where importing torch fails).

Batching wastes nothing: each window of texts is tokenised once, sorted by token count, cut into batches that
are padded only to their own longest text, and the vectors are handed back in the caller's order. Texts
longer than ``MAX_TOKENS`` are truncated; pass an :class:`EmbedStats` to learn how many were.

Thread safety: one embedder may be used from many threads at once. ORT's ``InferenceSession.run`` is
thread-safe, the tokenizer is configured once in ``__init__`` and never mutated afterwards (tokenizers'
``enable_truncation`` needs exclusive access, ``encode_batch`` does not), and every call keeps its own state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from nomic_export.errors import UserError
from nomic_export.layout import (
    CUSTOM_OPS_DIR,
    LIBRARY_NAME,
    MAX_TOKENS,
    TASK_PREFIXES,
    VARIANTS,
    apply_ort_config,
    inference_session,
    platform_tag,
    variant_onnx_path,
)

log = logging.getLogger(__name__)

# Every variant's graph is opset 23 (RotaryEmbedding), which onnxruntime runs from 1.23, also the first with a
# CPU kernel for com.microsoft::MoE (ortmoe). The op library itself needs only ORT C API 21 (SPEC.md section 4).
MIN_ORT_VERSION = (1, 23)
# Nomic trained Matryoshka truncation down to 64 features; the upper bound is the model's hidden size
# (768 for the real model; the tiny test model has 64, so there only dim=64 is valid).
MIN_DIM = 64
# Texts tokenised and sorted together: large enough that sorting packs batches tightly, small enough that
# embed() streams over a long iterable instead of holding it all.
WINDOW_BATCHES = 16
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass
class EmbedStats:
    """Per-call counts, filled in by :meth:`MoETextEmbedding.embed` as it goes (pass a fresh one per call).

    Attributes:
        texts: texts embedded so far.
        tokens: real (non-pad) tokens run through the model, task prefixes and ``<s>``/``</s>`` included.
        padded_tokens: tokens in the padded batches; ``tokens / padded_tokens`` is the packing efficiency.
        truncated: how many texts were cut to ``MAX_TOKENS`` tokens.
        truncated_indices: their positions in the caller's input.
    """

    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    truncated: int = 0
    truncated_indices: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Batch:
    """Model inputs for some texts, right-padded to the longest one (ids and mask are int64, (B, S))."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: list[bool]  # per row: cut to MAX_TOKENS


def check_onnxruntime_version(version: str) -> None:
    """Raise a UserError if ``version`` (onnxruntime's ``__version__``) is older than ``MIN_ORT_VERSION``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) < MIN_ORT_VERSION:
        need = ".".join(map(str, MIN_ORT_VERSION))
        raise UserError(
            f"onnxruntime {version!r} is too old: exported models need onnxruntime >= {need} "
            "(the graphs are ONNX opset 23). Run `pip install -U 'onnxruntime>={need}'`."
        )


def allow_patterns(variant: str, platform: str | None = None) -> list[str]:
    """The files of an OUT directory that ``variant`` needs: what a Hub download fetches, and nothing more.

    Args:
        variant: ``moe``, ``ortmoe`` or ``dense``.
        platform: the op-library folder for ``moe`` (default: this machine's, e.g. ``linux-x86_64``).

    Returns:
        ``snapshot_download`` allow-patterns: the graph and its external data, config and tokenizer files,
        and for ``moe`` the op library built for this platform.

    Example:
        >>> allow_patterns("dense")
        ['onnx/model_dense.onnx', 'onnx/model_dense.onnx_data', 'config.json', 'tokenizer.json', ...]
    """
    graph = variant_onnx_path(variant)
    patterns = [graph, f"{graph}_data", *CONFIG_FILES]
    if variant == "moe":
        patterns.append(f"{CUSTOM_OPS_DIR}/{platform or platform_tag()}/*")
    return patterns


def is_hub_id(path_or_hub_id: str) -> bool:
    """True if ``path_or_hub_id`` names a Hub repository rather than a local directory.

    An existing path is always local; so is anything that starts like a path (``/``, ``.``, ``~``). What is
    left is a Hub id if it has the ``owner/name`` form.
    """
    text = str(path_or_hub_id)
    if Path(text).expanduser().exists() or text.startswith(("/", ".", "~")):
        return False
    return _HUB_ID.fullmatch(text) is not None


def resolve_model_dir(
    path_or_hub_id: str | Path, variant: str, cache_dir: str | None = None, revision: str | None = None
) -> Path:
    """A local OUT directory holding ``variant``: the path itself, or a Hub snapshot of just its files."""
    text = str(path_or_hub_id)
    if is_hub_id(text):
        from huggingface_hub import snapshot_download

        log.info("downloading %s (%s variant) from the Hugging Face Hub", text, variant)
        try:
            local = snapshot_download(
                text, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns(variant)
            )
        except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found)
            raise UserError(
                f"could not download {text!r} from the Hugging Face Hub: {err}. "
                f"If {text!r} is meant to be a local directory, it does not exist."
            ) from err
        out = Path(local)
    else:
        out = Path(text).expanduser()
        if not out.is_dir():
            raise UserError(f"{text!r} is not a directory, nor a Hub id of the form owner/name")
    missing = [name for name in (variant_onnx_path(variant), "tokenizer.json") if not (out / name).is_file()]
    if missing:
        present = [v for v in VARIANTS if (out / variant_onnx_path(v)).is_file()]
        raise UserError(
            f"{out}: no {', '.join(missing)}, so the {variant!r} variant cannot run; "
            f"variants present: {', '.join(present) or 'none'}. "
            f"Export it with `nomic-export export --variants {variant}`."
        )
    return out


def find_op_library(out: Path) -> Path:
    """The com.nomic::MoE library: OUT's copy for this platform, else the installed package's build."""
    bundled = out / CUSTOM_OPS_DIR / platform_tag() / LIBRARY_NAME
    if bundled.is_file():
        return bundled
    from nomic_export import custom_ops  # torch-free except for its build()

    try:
        return Path(custom_ops.get_library_path())
    except UserError as err:
        shipped = sorted(p.name for p in (out / CUSTOM_OPS_DIR).iterdir()) if (out / CUSTOM_OPS_DIR).is_dir() else []
        raise UserError(
            f"{out} has no op library for this platform ({bundled} is missing; it ships "
            f"{', '.join(shipped) or 'none'}), and none is built in the installed package ({err}). "
            f"Build one with `pip install nomic-export && nomic-export build-ops` (needs a C++ compiler), "
            f"or use variant='ortmoe' or 'dense', which need no library."
        ) from err


def truncate_normalise(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    """Matryoshka: keep the first ``dim`` features of pooled vectors (B, H), then L2-normalise.

    The graph's ``sentence_embedding`` is already normalised over all H features. Normalising is a positive
    per-row scale, so truncating that vector and renormalising equals truncating the unnormalised mean and
    normalising it, which is what Nomic's recipe does (SPEC.md section 2; trap 10: features, not tokens).
    """
    if dim is None or dim == vectors.shape[-1]:
        return vectors
    kept = vectors[:, :dim]  # (B, dim)
    return kept / np.maximum(np.linalg.norm(kept, axis=-1, keepdims=True), 1e-12)


class MoETextEmbedding:
    """nomic-embed-text-v2-moe from an exported OUT directory or a Hub repository, with fastembed's API.

    Args:
        path_or_hub_id: an OUT directory, or a Hub id (downloads only the files ``variant`` needs).
        variant: ``moe`` (com.nomic::MoE, needs the op library), ``ortmoe`` (ORT's built-in MoE, >= 1.23)
            or ``dense`` (standard ops only).
        threads: ORT intra-op threads (default: ORT's choice, one per physical core).
        providers: ORT execution providers (default ``["CPUExecutionProvider"]``; the op is CPU-only).
        cache_dir: where Hub downloads go (default: huggingface_hub's cache).
        revision: Hub branch, tag or commit.

    Example:
        >>> model = MoETextEmbedding("out")
        >>> [q] = model.query_embed("What is the capital of France?")
        >>> docs = np.stack(list(model.passage_embed(["Paris is the capital of France."], dim=256)))
    """

    def __init__(
        self,
        path_or_hub_id: str | Path,
        variant: str = "moe",
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        cache_dir: str | None = None,
        revision: str | None = None,
    ):
        check_onnxruntime_version(ort.__version__)
        if variant not in VARIANTS:
            raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise UserError(f"threads is {threads!r}; pass an int >= 1, or 0 or None for ORT's choice (one per core)")
        self.path = resolve_model_dir(path_or_hub_id, variant, cache_dir=cache_dir, revision=revision)
        self.variant = variant
        config = json.loads((self.path / "config.json").read_text()) if (self.path / "config.json").is_file() else {}

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        apply_ort_config(options)
        if threads:
            options.intra_op_num_threads = threads
        if variant == "moe":
            self.op_library: Path | None = find_op_library(self.path)
            options.register_custom_ops_library(str(self.op_library))
        else:
            self.op_library = None
        graph = self.path / variant_onnx_path(variant)
        self.session = inference_session(str(graph), options, graph, providers=providers)
        width = {o.name: o.shape for o in self.session.get_outputs()}["sentence_embedding"][-1]
        self.hidden_size = width if isinstance(width, int) else int(config.get("n_embd", 768))

        # Configured here once and never again: concurrent encode_batch calls need an unmutated tokenizer.
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)
        pad = config.get("pad_token_id", self.tokenizer.token_to_id("<pad>"))
        self.pad_id = int(pad if pad is not None else 1)
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, which we never use: ~4x faster.
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    # ---- tokenising and batching ----

    def tokenize(self, texts: Sequence[str], task: str | None = None) -> Batch:
        """One right-padded batch for ``texts`` (with the task prefix, if given), as the model takes it."""
        encodings = self._encode_batch(self._prefixed(texts, task))
        return self._pad(encodings)

    def _prefixed(self, texts: Sequence[str], task: str | None, offset: int = 0) -> list[str]:
        prefix = ""
        if task is not None:
            if task not in TASK_PREFIXES:
                raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_PREFIXES)} (or None: no prefix)")
            prefix = TASK_PREFIXES[task]
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"documents[{offset + index}] is {type(text).__name__} {text!r}, not str")
        return [prefix + text for text in texts] if prefix else list(texts)

    def _pad(self, encodings) -> Batch:
        width = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
        # tokenizers keeps what truncation cut off in `overflowing` (stride 0): non-empty means truncated
        return Batch(ids, mask, [bool(e.overflowing) for e in encodings])

    # ---- embedding ----

    def _check_dim(self, dim: int | None) -> None:
        if dim is None:
            return
        low = min(MIN_DIM, self.hidden_size)
        if isinstance(dim, bool) or not isinstance(dim, int) or not low <= dim <= self.hidden_size:
            raise ValueError(
                f"dim is {dim!r}; Matryoshka dims run from {low} to {self.hidden_size} (the model's hidden size)"
            )

    def embed(
        self,
        documents: str | Iterable[str],
        batch_size: int = 32,
        task: str | None = None,
        dim: int | None = None,
        stats: EmbedStats | None = None,
    ) -> Iterator[np.ndarray]:
        """Embed texts, yielding one L2-normalised float32 vector per text, in the caller's order.

        Args:
            documents: a text or an iterable of texts; no prefix is added unless ``task`` is given.
            batch_size: texts per ``session.run``.
            task: ``search_query``, ``search_document``, ``classification`` or ``clustering``: prepends
                Nomic's prefix (``"search_query: "``, ...).
            dim: Matryoshka size, 64 to the hidden size (768): the pooled vector is truncated, then normalised.
            stats: an :class:`EmbedStats` to fill in (truncated texts, token counts).

        Returns:
            An iterator of ``(dim or hidden,)`` float32 arrays.

        Raises:
            TypeError: ``documents`` is not a str or an iterable, or an item is not a str (named by its index).
            ValueError: an unknown task, a dim out of range, or a batch_size below 1.

        Example:
            >>> vectors = np.stack(list(model.embed(["search_document: Hello!"])))
        """
        # Validate eagerly, then hand back a generator: errors surface at the call, not at the first next().
        self._check_dim(dim)
        if task is not None and task not in TASK_PREFIXES:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_PREFIXES)} (or None: no prefix)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size is {batch_size!r}; it must be an int >= 1")
        if isinstance(documents, str):
            documents = [documents]
        try:
            documents = iter(documents)
        except TypeError:
            kind = type(documents).__name__
            raise TypeError(f"documents is {kind} {documents!r}; pass a str or an iterable of str") from None
        return self._embed(documents, batch_size, task, dim, stats if stats is not None else EmbedStats())

    def _embed(self, documents: Iterator, batch_size: int, task, dim, stats: EmbedStats) -> Iterator[np.ndarray]:
        window = batch_size * WINDOW_BATCHES
        offset = 0
        while True:
            texts = [text for _, text in zip(range(window), documents)]
            if not texts:
                return
            yield from self._embed_window(texts, offset, batch_size, task, dim, stats)
            offset += len(texts)

    def _embed_window(self, texts: list, offset: int, batch_size: int, task, dim, stats: EmbedStats) -> list:
        encodings = self._encode_batch(self._prefixed(texts, task, offset))
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        vectors: list[np.ndarray | None] = [None] * len(encodings)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self._pad([encodings[i] for i in rows])
            (pooled,) = self.session.run(
                ["sentence_embedding"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            )
            pooled = truncate_normalise(pooled, dim)
            for row, index in enumerate(rows):
                vectors[index] = pooled[row]
            stats.tokens += int(batch.attention_mask.sum())
            stats.padded_tokens += batch.attention_mask.size
            for row, cut in zip(rows, batch.truncated):
                if cut:
                    stats.truncated += 1
                    stats.truncated_indices.append(offset + row)
        stats.texts += len(texts)
        return vectors

    def query_embed(
        self, query: str | Iterable[str], batch_size: int = 32, dim: int | None = None, stats: EmbedStats | None = None
    ) -> Iterator[np.ndarray]:
        """Embed queries with the ``search_query: `` prefix added (fastembed's ``query_embed``)."""
        return self.embed(query, batch_size=batch_size, task="search_query", dim=dim, stats=stats)

    def passage_embed(
        self, texts: str | Iterable[str], batch_size: int = 32, dim: int | None = None, stats: EmbedStats | None = None
    ) -> Iterator[np.ndarray]:
        """Embed documents with the ``search_document: `` prefix added (fastembed's ``passage_embed``)."""
        return self.embed(texts, batch_size=batch_size, task="search_document", dim=dim, stats=stats)
