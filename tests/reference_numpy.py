"""An independent numpy forward pass of nomic-embed-text-v2-moe, straight from SPEC.md section 2.

It reads the raw safetensors tensors (file layout, its own reshapes) and shares no code with
``nomic_export.exporter.model``. Each trap of SPEC.md section 3 can be switched on, so a test can show
that the trapped computation differs from the right one by more than the test's tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

_erf = np.vectorize(math.erf, otypes=[np.float64])


@dataclasses.dataclass(frozen=True)
class Traps:
    renormalise: bool = False  # 1: top-2 weights divided by their sum
    w2_as_e_h_f: bool = False  # 3: w2 viewed [E, H, F]
    bias_per_expert: bool = False  # 4: shared bias scaled by each gate weight
    tanh_gelu: bool = False  # 5
    interleaved_rope: bool = False  # 6
    rope_base: float = 10000.0  # 6: v1.5's 1000
    head_major_qkv: bool = False  # 7
    no_key_mask: bool = False  # 8: pads attended as keys
    pool_pads: bool = False  # 8: pads averaged into the embedding


def gelu(x: np.ndarray, tanh: bool = False) -> np.ndarray:
    x = x.astype(np.float64)
    if tanh:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class NumpyReference:
    def __init__(self, checkpoint: str | Path):
        checkpoint = Path(checkpoint)
        self.cfg = json.loads((checkpoint / "config.json").read_text())
        self.t = {k: v.astype(np.float64) for k, v in load_file(str(checkpoint / "model.safetensors")).items()}

    # --------------------------------------------------------------------------------- components

    def moe(self, i: int, x: np.ndarray, traps: Traps = Traps()) -> np.ndarray:
        """x [N, H] -> [N, H] for MoE layer i, looping over tokens (slow, obviously right)."""
        c, t = self.cfg, self.t
        E, F, H, k = c["num_experts"], c["n_inner"], c["n_embd"], c["moe_top_k"]
        p = f"encoder.layers.{i}.mlp."
        w1 = t[p + "experts.mlp.w1"].reshape(E, F, H)
        w2 = t[p + "experts.mlp.w2"].reshape(E, H, F).transpose(0, 2, 1) if traps.w2_as_e_h_f else t[
            p + "experts.mlp.w2"
        ].reshape(E, F, H)
        bias = t[p + "experts.bias"]
        probs = softmax(x @ t[p + "router.layer.weight"].T)  # (N, E)
        y = np.zeros_like(x)
        for n in range(x.shape[0]):
            top = np.argsort(-probs[n], kind="stable")[:k]
            weights = probs[n, top]
            if traps.renormalise:
                weights = weights / weights.sum()
            for e, w in zip(top, weights):
                y[n] += w * (gelu(x[n] @ w1[e].T, traps.tanh_gelu) @ w2[e])
                if traps.bias_per_expert:
                    y[n] += w * bias
            if not traps.bias_per_expert:
                y[n] += bias
        return y

    def dense(self, i: int, x: np.ndarray, traps: Traps = Traps()) -> np.ndarray:
        p, t = f"encoder.layers.{i}.mlp.", self.t
        h = gelu(x @ t[p + "fc1.weight"].T + t[p + "fc1.bias"], traps.tanh_gelu)
        return h @ t[p + "fc2.weight"].T + t[p + "fc2.bias"]

    def attention(self, i: int, x: np.ndarray, mask: np.ndarray, traps: Traps = Traps()) -> np.ndarray:
        """x [B, S, H], mask [B, S] -> [B, S, H]."""
        c, t = self.cfg, self.t
        B, S, H = x.shape
        nh = c["n_head"]
        D = H // nh
        p = f"encoder.layers.{i}.attn."
        qkv = x @ t[p + "Wqkv.weight"].T + t[p + "Wqkv.bias"]  # (B, S, 3H)
        if traps.head_major_qkv:
            qkv = qkv.reshape(B, S, nh, 3, D)
            q, k, v = (qkv[:, :, :, j] for j in range(3))
        else:
            qkv = qkv.reshape(B, S, 3, nh, D)
            q, k, v = (qkv[:, :, j] for j in range(3))  # each (B, S, nh, D)
        q, k = (self.rope(u, traps) for u in (q, k))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        if not traps.no_key_mask:
            scores = scores + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
        out = np.einsum("bhqk,bkhd->bqhd", softmax(scores), v).reshape(B, S, H)
        return out @ t[p + "out_proj.weight"].T + t[p + "out_proj.bias"]

    def rope(self, u: np.ndarray, traps: Traps = Traps()) -> np.ndarray:
        """u [B, S, nh, D] rotated by position, NeoX rotate-half layout unless the trap says interleaved."""
        S, D = u.shape[1], u.shape[-1]
        base = traps.rope_base if traps.rope_base != 10000.0 else float(self.cfg["rotary_emb_base"])
        inv_freq = base ** (-np.arange(0, D, 2) / D)
        ang = np.arange(S)[:, None] * inv_freq[None, :]  # (S, D/2)
        cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
        if traps.interleaved_rope:
            a, b = u[..., 0::2], u[..., 1::2]
            out = np.empty_like(u)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
            return out
        a, b = u[..., : D // 2], u[..., D // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    # ------------------------------------------------------------------------------------- model

    def forward(self, ids: np.ndarray, mask: np.ndarray, traps: Traps = Traps()) -> np.ndarray:
        c, t = self.cfg, self.t
        x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.token_type_embeddings.weight"][0]
        x = layer_norm(x, t["emb_ln.weight"], t["emb_ln.bias"])
        B, S, H = x.shape
        for i in range(c["n_layer"]):
            p = f"encoder.layers.{i}."
            x = layer_norm(x + self.attention(i, x, mask, traps), t[p + "norm1.weight"], t[p + "norm1.bias"])
            if i % 2 == 1:  # MoE on odd layers (SPEC.md section 1)
                y = self.moe(i, x.reshape(B * S, H), traps).reshape(B, S, H)
            else:
                y = self.dense(i, x, traps)
            x = layer_norm(x + y, t[p + "norm2.weight"], t[p + "norm2.bias"])
        return x

    @staticmethod
    def pool(h: np.ndarray, mask: np.ndarray, dim: int | None = None, traps: Traps = Traps()) -> np.ndarray:
        keep = np.ones_like(mask) if traps.pool_pads else mask
        mean = (h * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)
        if dim is not None:
            mean = mean[:, :dim]
        return mean / np.linalg.norm(mean, axis=-1, keepdims=True)
