"""Finding, checking and loading a nomic-embed-text-v2-moe checkpoint.

A checkpoint is a local directory or a Hub model id. It is read with safetensors only: no remote code is
executed (trap 11) and nothing is unpickled. Every tensor name and shape is checked against the config
before a model is built.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nomic_export.errors import UserError
from nomic_export.exporter.model import NomicMoEConfig, NomicMoEModel
from nomic_export.layout import SENTENCE_TRANSFORMERS_FILES, TOKENIZER_FILES

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Hub download fetches: never *.bin/*.pt (pickles) and never *.py (remote code).
HUB_ALLOW_PATTERNS = [
    "config.json",
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    "model-*-of-*.safetensors",
    *TOKENIZER_FILES,
    *SENTENCE_TRANSFORMERS_FILES,
]


# ------------------------------------------------------------------------------- the tensor name table


def tensor_table(cfg: NomicMoEConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every checkpoint tensor: name -> (shape in the file, shape in our model).

    Names are the checkpoint's own and equal our parameter names. The two shapes differ in one place only:
    the experts' weights are stored [E*F, H] and viewed [E, F, H] (w2 too: not [E, H, F], trap 3).
    """
    H, F, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.vocab_size
    same = lambda *shape: (shape, shape)  # noqa: E731
    table = {
        "embeddings.word_embeddings.weight": same(V, H),
        "embeddings.token_type_embeddings.weight": same(cfg.type_vocab_size, H),
        "emb_ln.weight": same(H),
        "emb_ln.bias": same(H),
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        table |= {
            p + "attn.Wqkv.weight": same(3 * H, H),  # rows q | k | v
            p + "attn.Wqkv.bias": same(3 * H),
            p + "attn.out_proj.weight": same(H, H),
            p + "attn.out_proj.bias": same(H),
            p + "norm1.weight": same(H),
            p + "norm1.bias": same(H),
            p + "norm2.weight": same(H),
            p + "norm2.bias": same(H),
        }
        if cfg.is_moe_layer(i):
            table |= {
                p + "mlp.router.layer.weight": same(E, H),
                p + "mlp.experts.mlp.w1": ((E * F, H), (E, F, H)),
                p + "mlp.experts.mlp.w2": ((E * F, H), (E, F, H)),
                p + "mlp.experts.bias": same(H),
            }
        else:
            table |= {
                p + "mlp.fc1.weight": same(F, H),
                p + "mlp.fc1.bias": same(F),
                p + "mlp.fc2.weight": same(H, F),
                p + "mlp.fc2.bias": same(H),
            }
    return table


# ---------------------------------------------------------------------------------------- resolving


def resolve_checkpoint(model: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Return a local directory holding the checkpoint, downloading from the Hub when ``model`` is a Hub id.

    Args:
        model: a local directory, or a Hub model id such as ``nomic-ai/nomic-embed-text-v2-moe``.
        revision: a Hub branch, tag or commit (Hub ids only).
        cache_dir: the huggingface_hub cache to use.
    Returns:
        The checkpoint directory.
    Raises:
        UserError: no such directory, not a checkpoint directory, or the download failed.
    Example:
        >>> resolve_checkpoint("./tiny")
        PosixPath('tiny')
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise UserError(f"--revision {revision!r} applies to Hub ids only, but {str(model)!r} is a local directory.")
        directory = path
    elif path.exists():
        raise UserError(f"{str(model)!r} is a file, not a checkpoint directory; pass the directory holding config.json.")
    elif not HUB_ID.match(str(model)) or str(model).startswith((".", "/", "~")):
        raise UserError(
            f"no checkpoint directory {str(model)!r}: it does not exist and is not a Hub id (OWNER/NAME). "
            "Check the path, or pass a Hub id such as nomic-ai/nomic-embed-text-v2-moe."
        )
    else:
        directory = _download(str(model), revision, cache_dir)
    _check_files(directory)
    return directory


def _download(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    log.info("resolve: downloading %s%s from the Hub", repo_id, f"@{revision}" if revision else "")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_ALLOW_PATTERNS)
        )
    except RepositoryNotFoundError as err:
        raise UserError(f"Hub repo {repo_id!r} not found (or private: log in with `hf auth login`): {err}") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise UserError(
            f"could not download {repo_id!r}{f' at revision {revision!r}' if revision else ''} and it is not a "
            f"local directory: {err}. Check the network, or download the checkpoint and pass its directory."
        ) from None


def _check_files(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory}: no config.json; pass the directory of a Hugging Face checkpoint.")
    if not (directory / WEIGHTS_NAME).is_file() and not (directory / WEIGHTS_INDEX_NAME).is_file():
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {found}: pickled weights are never loaded)" if found else ""
        raise UserError(
            f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{hint}; this tool reads safetensors only."
        )
    if not (directory / "tokenizer.json").is_file():
        raise UserError(
            f"{directory / 'tokenizer.json'}: missing; the export ships the fast tokenizer beside the model. "
            "Copy tokenizer.json from nomic-ai/nomic-embed-text-v2-moe into the checkpoint directory."
        )


# ------------------------------------------------------------------------------------------ loading


def load_config(directory: Path) -> NomicMoEConfig:
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err}); restore the checkpoint's config.json.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(raw).__name__}.")
    return NomicMoEConfig.from_dict(raw, source=str(path))


def _weight_files(directory: Path) -> list[Path]:
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index_path = directory / WEIGHTS_INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{index_path}: not a safetensors index with a 'weight_map' ({err!r}).") from None
    files = []
    for name in names:
        shard = (directory / name).resolve()
        if shard.parent != directory.resolve() or not shard.is_file():
            raise UserError(f"{index_path}: shard {name!r} is missing from {directory}; download every shard.")
        files.append(shard)
    return files


def _read_header_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = (tuple(f.get_slice(name).get_shape()), path)
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(
                f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt. Download it again."
            ) from None
    return shapes


def check_tensors(cfg: NomicMoEConfig, files: list[Path]) -> None:
    """Compare the files' tensor names and shapes with the table; one error lists every problem, sorted."""
    table = tensor_table(cfg)
    found = _read_header_shapes(files)
    missing = sorted(set(table) - set(found))
    unexpected = sorted(set(found) - set(table))
    misshaped = sorted(n for n in set(table) & set(found) if found[n][0] != table[n][0])
    if not (missing or unexpected or misshaped):
        return
    first = 8
    lines = [f"{', '.join(str(f) for f in files)}: the tensors do not match config.json"]
    if missing:
        lines.append(f"  missing ({len(missing)}):")
        lines += [f"    {n}  expected {list(table[n][0])}" for n in missing[:first]]
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}):")
        lines += [f"    {n}  shape {list(found[n][0])}" for n in unexpected[:first]]
    if misshaped:
        lines.append(f"  mis-shaped ({len(misshaped)}):")
        lines += [f"    {n}  expected {list(table[n][0])}, found {list(found[n][0])}" for n in misshaped[:first]]
    lines.append("Use the unmodified checkpoint whose config.json this is.")
    raise UserError("\n".join(lines))


def check_checkpoint(directory: str | Path) -> tuple[NomicMoEConfig, list[Path]]:
    """Check a checkpoint directory without loading its weights: files, config, and every tensor's name and shape.

    Returns:
        The config and the safetensors files.
    Raises:
        UserError: as ``load_model``, before any weight is read.
    """
    directory = Path(directory)
    _check_files(directory)
    cfg = load_config(directory)
    files = _weight_files(directory)
    check_tensors(cfg, files)
    return cfg, files


def load_model(directory: str | Path) -> NomicMoEModel:
    """Build the reference model from a checkpoint directory, strictly, in eval mode, fp32.

    Args:
        directory: a checkpoint directory (see ``resolve_checkpoint``).
    Returns:
        The model, its config at ``model.config``.
    Raises:
        UserError: a bad config, missing/unexpected/mis-shaped tensors, a corrupt file.
    Example:
        >>> model = load_model(resolve_checkpoint("nomic-ai/nomic-embed-text-v2-moe"))
    """
    cfg, files = check_checkpoint(directory)
    table = tensor_table(cfg)
    with torch.device("meta"):
        model = NomicMoEModel(cfg)
    state = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name).to(torch.float32).reshape(table[name][1])
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise UserError(f"{path}: reading tensors failed ({err}); the file is truncated or corrupt.") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
