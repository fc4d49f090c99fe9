"""Random checkpoints in the real format: config.json with the real key set, model.safetensors with the real
tensor names, and an XLM-R-shaped Unigram tokenizer. ``tiny`` is for tests, ``full`` has the real sizes.

The weights are random but make routing matter: router logits are spread (std ~2), so every expert gets
tokens on ordinary text and the top-2 choice is rarely a near-tie, and every expert has its own weights.
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from nomic_export.errors import UserError
from nomic_export.exporter.checkpoint import WEIGHTS_NAME, tensor_table
from nomic_export.exporter.model import NomicMoEConfig

# The real config.json of nomic-ai/nomic-embed-text-v2-moe (keys and values); presets override the sizes.
REAL_CONFIG = {
    "activation_function": "gelu",
    "architectures": ["NomicBertModel"],
    "attn_pdrop": 0.0,
    "auto_map": {
        "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
        "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
    },
    "bos_token_id": None,
    "causal": False,
    "dense_seq_output": True,
    "embd_pdrop": 0.1,
    "eos_token_id": None,
    "expert_choice_router": False,
    "ffn_div": 1,
    "fused_bias_fc": True,
    "fused_dropout_add_ln": True,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "max_trained_positions": 2048,
    "mlp_fc1_bias": True,
    "mlp_fc2_bias": True,
    "model_type": "nomic_bert",
    "moe_every_n_layers": 2,
    "moe_impl": "megablocks",
    "moe_normalize_expert_weights": False,
    "moe_resid_pdrop": 0.0,
    "moe_top_k": 2,
    "n_embd": 768,
    "n_head": 12,
    "n_inner": 3072,
    "n_layer": 12,
    "n_positions": 2048,
    "num_experts": 8,
    "num_shared_experts": 0,
    "pad_token_id": 1,
    "pad_vocab_size_multiple": 64,
    "parallel_block": False,
    "parallel_block_tied_norm": False,
    "prenorm": False,
    "qkv_proj_bias": True,
    "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.0,
    "rotary_emb_base": 10000,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "router_aux_loss_coef": 0.1,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "summary_activation": None,
    "summary_first_dropout": 0.0,
    "summary_proj_to_labels": True,
    "summary_type": "cls_index",
    "summary_use_proj": True,
    "torch_dtype": "float32",
    "transformers_version": "4.49.0",
    "type_vocab_size": 1,
    "use_cache": True,
    "use_flash_attn": True,
    "use_rms_norm": None,
    "use_xentropy": True,
    "vocab_size": 250048,
}

# Tokenizer ids used by the real model: 250002 pieces (<mask> last), embedding table padded to 250048.
PRESETS = {
    "tiny": {"n_embd": 64, "n_head": 4, "n_layer": 4, "n_inner": 128, "num_experts": 8, "moe_top_k": 2},
    "full": {},
}
FULL_TOKENIZER_SIZE = 250002
ROUTER_LOGIT_STD = 2.0  # spread logits: every expert gets tokens, top-2 rarely a near-tie

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as XLM-R; <mask> is the last id


def write_random_checkpoint(directory: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random checkpoint in the real format.

    Args:
        directory: where to write; written to a temporary sibling and renamed, so a failure leaves nothing.
        preset: ``tiny`` (hidden 64, 4 layers, for tests) or ``full`` (the real sizes, 1.9 GB, for benchmarks).
        seed: the random seed; equal seeds give equal files.
        overwrite: replace an existing directory.
    Returns:
        The directory.
    Example:
        >>> write_random_checkpoint("/tmp/tiny", preset="tiny")
        PosixPath('/tmp/tiny')
    """
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}.")
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(f"{directory} already exists; pass --overwrite to replace it, or choose another directory.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _write(tmp, preset, seed)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write(out: Path, preset: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pieces = _pieces(FULL_TOKENIZER_SIZE if preset == "full" else None)
    raw = dict(REAL_CONFIG, **PRESETS[preset])
    if preset != "full":  # the embedding table rounded up as upstream does (pad_vocab_size_multiple)
        raw["vocab_size"] = -(-(len(pieces)) // 64) * 64
    cfg = NomicMoEConfig.from_dict(raw)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_file(_random_tensors(cfg, rng), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    _write_tokenizer(out, pieces)
    _write_sentence_transformers_files(out, cfg.hidden_size)


def _random_tensors(cfg: NomicMoEConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tensors = {}
    for name, (shape, _) in tensor_table(cfg).items():
        fan_in = shape[-1]
        if name.endswith("router.layer.weight"):
            # LayerNorm outputs have unit-variance features, so logits get std ~ROUTER_LOGIT_STD.
            scale = ROUTER_LOGIT_STD / np.sqrt(fan_in)
        elif name.endswith(("norm1.weight", "norm2.weight", "emb_ln.weight")):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            continue
        elif name.endswith("embeddings.weight"):
            scale = 1.0  # the pad row too: non-zero, so pooling over pads would show (trap 8)
        elif name.endswith("bias"):
            scale = 0.1
        else:
            scale = 1.0 / np.sqrt(fan_in)
        tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return tensors


# -------------------------------------------------------------------------------------------- tokenizer

# Characters of the probe texts' scripts, so a tiny tokenizer covers them with few <unk>.
SCRIPT_CHARS = (
    string.ascii_letters
    + string.digits
    + string.punctuation
    + "¡¿áéíóúñüçàèâêôöäßøåæœ"
    + "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЭЮЯ"
    + "αβγδεζηθικλμνξοπρστυφχψωάέήίόύώ"
    + "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"
    + "אבגדהוזחטיכלמנסעפצקרשת"
    + "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसहािीुूेैोौंः्"
    + "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮะัาำิีึืุูเแโใไ่้๊๋"
    + "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明"
    + "日本語のはをにがでとしたてるまですかなこれそあいうえおきくけさすせつねひふへほみむめもやゆよらりれろわん"
    + "한국어는이가을를에서의와과하다니요고도안녕세계"
)
COMMON_WORDS = (
    "the of and to in is a that for it on with as was be by this are from at or an which not have "
    "search _query _document : query document classification clustering hello world model embedding text language "
    "der die das und ist ein la le les de et un une el los las que en por para una il di che "
    "привет мир это как что"
).split()


def _pieces(size: int | None) -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores: characters, then common words, then (to reach ``size``)
    synthetic letter combinations, each with and without the word-start marker."""
    seen: dict[str, float] = {}

    def add(piece: str, score: float) -> None:
        seen.setdefault(piece, score)

    for ch in dict.fromkeys(SCRIPT_CHARS):
        add(ch, -8.0)
        add("\u2581" + ch, -7.5)
    add("\u2581", -6.0)
    for word in COMMON_WORDS:
        add("\u2581" + word, -4.0)
        add(word, -4.5)
    if size is not None:
        target = size - len(SPECIAL_TOKENS) - 1
        letters = string.ascii_lowercase
        length = 2
        while len(seen) < target:
            for i in range(len(letters) ** length):
                word = "".join(letters[(i // len(letters) ** p) % len(letters)] for p in range(length))
                add(word, -6.0 - length)
                if len(seen) < target:
                    add("\u2581" + word, -5.5 - length)
                if len(seen) >= target:
                    break
            length += 1
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + list(seen.items()) + [("<mask>", 0.0)]
    return vocab


def _write_tokenizer(out: Path, vocab: list[tuple[str, float]]) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>")))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), "\u2581"), normalizers.Strip(right=True)]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    mask = AddedToken("<mask>", lstrip=True, special=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS] + [mask])
    tok.save(str(out / "tokenizer.json"))

    special = {
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": {"content": "<mask>", "lstrip": True, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": True,
        "cls_token": "<s>",
        "eos_token": "</s>",
        "mask_token": "<mask>",
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sep_token": "</s>",
        "tokenizer_class": "XLMRobertaTokenizer",
        "unk_token": "<unk>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _write_sentence_transformers_files(out: Path, hidden_size: int) -> None:
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": {"max_seq_length": 512, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": {"query": "search_query: ", "passage": "search_document: "},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        "1_Pooling/config.json": {"word_embedding_dimension": hidden_size, "pooling_mode_mean_tokens": True},
    }
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
