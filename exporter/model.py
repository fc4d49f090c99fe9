"""The PyTorch reference of nomic-embed-text-v2-moe (NomicBert-MoE), inference only, fp32.

Read top to bottom in paper order: config, embeddings, rotary attention, router and experts (the MoE op),
block, encoder, pooling. The math is ../shared/SPEC.md section 2; the comments cite the traps of section 3
that each line avoids. Parameter names are the checkpoint's own (``exporter/checkpoint.py`` holds the table),
so loading is a strict ``load_state_dict``.

The MoE feed-forward is the torch custom op ``nomic::moe``: eager mode runs true top-k dispatch (each expert
sees only its routed tokens); under ``torch.export`` it is one opaque node with a fake implementation, which
the exporter maps to ``com.nomic::MoE`` (or another variant's subgraph) instead of tracing the routing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nomic_export.errors import UserError

# --------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class NomicMoEConfig:
    """The config.json values the model reads (SPEC.md section 1), under readable names."""

    vocab_size: int = 250048  # vocab_size: embedding rows (the tokenizer uses 250002)
    hidden_size: int = 768  # n_embd
    num_heads: int = 12  # n_head; head dim = hidden_size / num_heads = 64
    num_layers: int = 12  # n_layer
    intermediate_size: int = 3072  # n_inner: dense FFN width and each expert's width
    type_vocab_size: int = 1  # token-type rows; only row 0 is ever used
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5  # layer_norm_epsilon, all LayerNorms
    rotary_base: float = 10000.0  # rotary_emb_base (v1.5 used 1000: trap 6)
    max_positions: int = 2048  # max_trained_positions
    num_experts: int = 8
    top_k: int = 2  # moe_top_k
    moe_every_n_layers: int = 2  # layer i is MoE iff i % moe_every_n_layers == 1 (trap 2)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, i: int) -> bool:
        """Upstream contrastors NomicBertEncoder: MoE iff ``i % moe_every_n_layers == 1``."""
        return i % self.moe_every_n_layers == 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> NomicMoEConfig:
        """Validate a checkpoint's config.json and return the typed config.

        Args:
            raw: the parsed config.json.
            source: the file's path, named in error messages.
        Returns:
            The config.
        Raises:
            UserError: a checkpoint of another family, or a value this family never uses.
        Example:
            >>> NomicMoEConfig.from_dict(json.load(open("config.json"))).num_experts
            8
        """
        model_type = raw.get("model_type")
        if model_type != "nomic_bert":
            raise UserError(
                f"{source}: model_type is {model_type!r}, not 'nomic_bert'; this tool exports "
                "nomic-embed-text-v2-moe (a NomicBert Mixture-of-Experts checkpoint). "
                "Point it at nomic-ai/nomic-embed-text-v2-moe or a directory holding that checkpoint."
            )
        if not raw.get("num_experts") or not raw.get("moe_every_n_layers"):
            raise UserError(
                f"{source}: no experts (num_experts={raw.get('num_experts')!r}, "
                f"moe_every_n_layers={raw.get('moe_every_n_layers')!r}); this looks like "
                "nomic-embed-text-v1/v1.5, which has no MoE layers. This tool exports only "
                "nomic-embed-text-v2-moe; export v1.5 with a standard ONNX exporter instead."
            )
        # Values this family never uses: refuse rather than compute something else.
        refused = {
            "prenorm": (False, "post-norm blocks"),
            "activation_function": ("gelu", "exact erf GELU"),
            "rotary_emb_interleaved": (False, "NeoX rotate-half RoPE"),
            "rotary_emb_fraction": (1.0, "RoPE on every head dimension"),
            "moe_normalize_expert_weights": (False, "raw top-k probabilities, not renormalised"),
            "num_shared_experts": (0, "no shared experts"),
            "qkv_proj_bias": (True, "biased QKV projection"),
            "mlp_fc1_bias": (True, "biased fc1"),
            "mlp_fc2_bias": (True, "biased fc2"),
            "causal": (False, "bidirectional attention"),
            "parallel_block": (False, "sequential attention then FFN"),
        }
        for key, (expected, meaning) in refused.items():
            value = raw.get(key)
            if value is not None and value != expected:  # absent or null means the family's default
                raise UserError(
                    f"{source}: {key}={value!r}, but nomic-embed-text-v2-moe uses {expected!r} ({meaning}); "
                    "this tool refuses rather than compute a different model. "
                    "Use the unmodified config.json of nomic-ai/nomic-embed-text-v2-moe."
                )
        if raw.get("use_rms_norm"):
            raise UserError(f"{source}: use_rms_norm={raw['use_rms_norm']!r}; this family uses LayerNorm.")

        hidden = _positive_int(raw, "n_embd", source)
        cfg = cls(
            vocab_size=_positive_int(raw, "vocab_size", source),
            hidden_size=hidden,
            num_heads=_positive_int(raw, "n_head", source),
            num_layers=_positive_int(raw, "n_layer", source),
            intermediate_size=int(raw.get("n_inner") or 4 * hidden),
            type_vocab_size=_positive_int(raw, "type_vocab_size", source),
            pad_token_id=int(raw.get("pad_token_id", 1)),
            layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
            rotary_base=float(raw.get("rotary_emb_base", 10000)),
            max_positions=int(raw.get("max_trained_positions", raw.get("n_positions", 2048))),
            num_experts=_positive_int(raw, "num_experts", source),
            top_k=_positive_int(raw, "moe_top_k", source),
            moe_every_n_layers=_positive_int(raw, "moe_every_n_layers", source),
        )
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 2:
            raise UserError(
                f"{source}: n_embd={cfg.hidden_size} is not divisible into {cfg.num_heads} heads of even width; "
                "the checkpoint's config is inconsistent."
            )
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise UserError(f"{source}: moe_top_k={cfg.top_k!r} must lie in 1..num_experts={cfg.num_experts}.")
        return cfg


def _positive_int(raw: dict[str, Any], key: str, source: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{source}: {key}={value!r}; expected a positive integer. Is this config.json complete?")
    return value


# ----------------------------------------------------------------------------------------- embeddings


class Embeddings(nn.Module):
    """Word embedding plus token-type row 0; no position embeddings (RoPE is in attention)."""

    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # (B, S, H)


# ---------------------------------------------------------------------------------- rotary attention


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles for positions 0..seq_len-1, each (S, head_dim / 2).

    Computed from ``seq_len`` on every call, never cached, so an export keeps it dynamic (trap 12).
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)  # (D/2,)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (S, D/2)
    return angles.cos(), angles.sin()


def rope(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """RoPE on u (B, S, nh * D) at positions 0..S-1, each head rotated as ``u*cos + rotate_half(u)*sin``.

    NeoX layout, not interleaved (trap 6): ``rotate_half(u) = concat(-u[D/2:], u[:D/2])`` and both halves use the
    same D/2 angles. ``torch.onnx.ops.rotary_embedding`` computes exactly that in eager mode and exports as one
    ONNX RotaryEmbedding-23 node, which ONNX Runtime runs in one pass; the six-op decomposition (split, neg,
    concat, two muls, add) took ~8x as long (benchmarks/README.md).
    """
    B, S, _ = u.shape
    positions = torch.arange(S, device=u.device).expand(B, S)
    return torch.onnx.ops.rotary_embedding(u, cos, sin, positions, interleaved=False, num_heads=num_heads)


class Attention(nn.Module):
    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.num_heads, self.head_dim, self.rotary_base = cfg.num_heads, cfg.head_dim, cfg.rotary_base
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = self.Wqkv(x).split(H, dim=-1)  # rows q | k | v, heads contiguous inside each (trap 7)
        cos, sin = rotary_cos_sin(S, self.head_dim, self.rotary_base, device=x.device)
        q, k = rope(q, cos, sin, self.num_heads), rope(k, cos, sin, self.num_heads)
        q, k, v = (u.view(B, S, self.num_heads, self.head_dim).transpose(1, 2) for u in (q, k, v))  # (B, nh, S, D)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask_add  # (B, nh, S, S)
        out = scores.softmax(dim=-1) @ v  # (B, nh, S, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, H))


# -------------------------------------------------------------------------------- router and experts

ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h, approximate="none"),  # exact erf GELU, this model's (trap 5)
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}


@torch.library.custom_op("nomic::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    activation: str,
    normalize_routing_weights: bool,
) -> torch.Tensor:
    """Mixture-of-Experts feed-forward with true top-k dispatch; the same contract as com.nomic::MoE.

        x [N, H], router_weight [E, H], w1 [E, F, H], w2 [E, F, H], bias [H]  ->  y [N, H]
        p = softmax(x @ router_weight.T)                      # fp32, over all E experts
        (w_j, e_j) = top_k(p)                                  # raw probabilities unless normalize (trap 1)
        y = sum_j w_j * act(x @ w1[e_j].T) @ w2[e_j] + bias    # bias once, unscaled (trap 4)

    Each expert multiplies only the tokens routed to it; an expert with no tokens costs nothing.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; expected one of {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    probs = (x.float() @ router_weight.float().T).softmax(dim=-1)  # (N, E), routing in fp32 (trap 9)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k)
    if normalize_routing_weights:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(router_weight.shape[0]):
        tokens, slot = (experts == e).nonzero(as_tuple=True)  # the tokens routed to e, and which of their k
        if tokens.numel() == 0:
            continue
        h = act(x[tokens].float() @ w1[e].float().T)  # (n_e, F)
        y.index_add_(0, tokens, (h @ w2[e].float()) * weights[tokens, slot, None])  # w2[e] is (F, H) (trap 3)
    return (y + bias.float()).to(x.dtype)


@moe.register_fake
def _moe_fake(x, router_weight, w1, w2, bias, top_k, activation, normalize_routing_weights):
    return torch.empty_like(x)


class Router(nn.Module):
    """Linear router without bias; its softmax and top-k live inside the MoE op."""

    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.layer = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)


class ExpertWeights(nn.Module):
    """The experts' stacked weights, [E, F, H] each (the checkpoint stores [E*F, H]; see checkpoint.py)."""

    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        shape = (cfg.num_experts, cfg.intermediate_size, cfg.hidden_size)
        self.w1 = nn.Parameter(torch.empty(shape))
        self.w2 = nn.Parameter(torch.empty(shape))


class Experts(nn.Module):
    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.mlp = ExpertWeights(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size))  # shared output bias, added once


class MoEMLP(nn.Module):
    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = Router(cfg)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        y = moe(
            x.reshape(B * S, H),  # every token, pads included: routing is per token
            self.router.layer.weight,
            self.experts.mlp.w1,
            self.experts.mlp.w2,
            self.experts.bias,
            self.top_k,
            "gelu",
            False,
        )
        return y.view(B, S, H)


class DenseMLP(nn.Module):
    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


# --------------------------------------------------------------------------------------- block, encoder


class Block(nn.Module):
    """Post-norm block: x = LN1(x + attn(x)); x = LN2(x + mlp(x))."""

    def __init__(self, cfg: NomicMoEConfig, index: int):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MoEMLP(cfg) if cfg.is_moe_layer(index) else DenseMLP(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask_add))
        return self.norm2(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))


class NomicMoEModel(nn.Module):
    """input_ids, attention_mask (B, S) int64 -> last_hidden_state (B, S, H); no final norm, no pooler."""

    def __init__(self, cfg: NomicMoEConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.emb_ln(self.embeddings(input_ids))  # (B, S, H)
        # Pads are masked as keys only (trap 8); their own rows are computed and later ignored by pooling.
        keep = attention_mask[:, None, None, :].to(x.dtype)  # (B, 1, 1, S)
        mask_add = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.encoder.layers:
            x = layer(x, mask_add)
        return x


# -------------------------------------------------------------------------------------------- pooling


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sentence embeddings: masked mean over real tokens, Matryoshka-truncate to ``dim`` features, L2-normalise.

    Truncation slices features of the pooled vector, not tokens (trap 10), and happens before normalising.
    """
    keep = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, S, 1)
    mean = (last_hidden_state * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (B, H)
    if dim is not None:
        mean = mean[:, :dim]
    return F.normalize(mean, p=2.0, dim=-1)
