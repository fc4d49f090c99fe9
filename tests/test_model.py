"""The PyTorch reference model against an independent numpy computation (tests/reference_numpy.py).

One test per trap of SPEC.md section 3, items 1-8: each checks the model against the right computation
and shows that the trapped computation is far outside the tolerance, so introducing the trap fails it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_numpy import NumpyReference, Traps

from nomic_export.exporter.model import NomicMoEConfig, moe, pool

# fp32 model vs float64 numpy: rounding stays near 1e-6 of the output's scale on the tiny model.
FP32_REL_TOL = 1e-5
# A trap must move the result by at least this many tolerances, or the test could not tell it apart.
TRAP_MARGIN = 10


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    return NumpyReference(tiny_checkpoint)


@pytest.fixture(scope="module")
def batch(tiny_model):
    """Two sequences, the second right-padded, with ordinary token ids."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, tiny_model.config.vocab_size - 1, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = tiny_model.config.pad_token_id
    return ids, mask


def rel_err(got, want) -> float:
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_trap(got, want, trapped) -> None:
    """The model matches the right computation, and the trapped one is far off."""
    assert rel_err(got, want) <= FP32_REL_TOL
    assert rel_err(trapped, want) > TRAP_MARGIN * FP32_REL_TOL


def layer_input(model, ids, mask, layer):
    """The hidden state entering block ``layer``'s FFN (after its attention), from the model's own modules."""
    with torch.no_grad():
        x = model.emb_ln(model.embeddings(ids))
        mask_add = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for i in range(layer):
            x = model.encoder.layers[i](x, mask_add)
        block = model.encoder.layers[layer]
        return block.norm1(x + block.attn(x, mask_add))


def attention_case(model, batch):
    """Block 0's attention on the embeddings: (the model's output, the input and mask as numpy)."""
    ids, mask = batch
    with torch.no_grad():
        x = model.emb_ln(model.embeddings(ids))
        mask_add = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        got = model.encoder.layers[0].attn(x, mask_add)
    return got, x.double().numpy(), mask.numpy()


def ffn_case(model, batch, layer):
    """Block ``layer``'s FFN on its real input: (the model's output [T, H], the input as float64 numpy [T, H])."""
    x = layer_input(model, *batch, layer=layer)
    x2 = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        got = model.encoder.layers[layer].mlp(x).reshape(x2.shape)
    return got, x2.double().numpy()


def test_trap1_top2_weights_are_not_renormalised(tiny_model, ref, batch):
    got, xs = ffn_case(tiny_model, batch, 1)
    check_trap(got, ref.moe(1, xs), ref.moe(1, xs, Traps(renormalise=True)))


def test_trap2_moe_layers_are_the_odd_ones(tiny_model, ref, batch):
    ids, mask = batch
    moe_layers = [i for i, block in enumerate(tiny_model.encoder.layers) if hasattr(block.mlp, "router")]
    assert moe_layers == [1, 3]  # SPEC.md section 1: layer i is MoE iff i % 2 == 1
    assert [i for i in range(12) if NomicMoEConfig().is_moe_layer(i)] == [1, 3, 5, 7, 9, 11]
    with torch.no_grad():
        got = tiny_model(ids, mask)
    want = ref.forward(ids.numpy(), mask.numpy())
    assert rel_err(got * mask[..., None], want * mask.numpy()[..., None]) <= FP32_REL_TOL


def test_trap3_w2_is_e_f_h(tiny_model, ref, batch):
    got, xs = ffn_case(tiny_model, batch, 3)
    check_trap(got, ref.moe(3, xs), ref.moe(3, xs, Traps(w2_as_e_h_f=True)))


def test_trap4_shared_bias_added_once_unscaled(tiny_model, ref, batch):
    got, xs = ffn_case(tiny_model, batch, 1)
    check_trap(got, ref.moe(1, xs), ref.moe(1, xs, Traps(bias_per_expert=True)))


def test_trap5_gelu_is_exact_erf_in_dense_and_experts(tiny_model, ref, batch):
    for layer in (0, 1):
        got, xs = ffn_case(tiny_model, batch, layer)
        component = ref.moe if layer % 2 else (lambda i, a, traps=Traps(): ref.dense(i, a, traps))
        check_trap(got, component(layer, xs), component(layer, xs, Traps(tanh_gelu=True)))


@pytest.mark.parametrize("trap", [Traps(interleaved_rope=True), Traps(rope_base=1000.0)], ids=["interleaved", "base1000"])
def test_trap6_rope_is_rotate_half_base_10000(tiny_model, ref, batch, trap):
    got, xs, ms = attention_case(tiny_model, batch)
    check_trap(got, ref.attention(0, xs, ms), ref.attention(0, xs, ms, trap))


def test_trap7_wqkv_split_is_q_k_v_major(tiny_model, ref, batch):
    got, xs, ms = attention_case(tiny_model, batch)
    check_trap(got, ref.attention(0, xs, ms), ref.attention(0, xs, ms, Traps(head_major_qkv=True)))


def test_trap8_pads_masked_as_keys_and_not_pooled(tiny_model, ref, batch):
    ids, mask = batch
    with torch.no_grad():
        h = tiny_model(ids, mask)
        got = pool(h, mask)
    ms = mask.numpy()
    want_h = ref.forward(ids.numpy(), ms)
    real = ms[..., None]
    check_trap(h * mask[..., None], want_h * real, ref.forward(ids.numpy(), ms, Traps(no_key_mask=True)) * real)
    check_trap(got, ref.pool(want_h, ms), ref.pool(want_h, ms, traps=Traps(pool_pads=True)))


def test_sentence_alone_equals_sentence_in_padded_batch(tiny_model):
    g = torch.Generator().manual_seed(2)
    short = torch.randint(4, 500, (1, 5), generator=g)
    long = torch.randint(4, 500, (1, 17), generator=g)
    ids = torch.full((2, 17), tiny_model.config.pad_token_id)
    ids[0, :5], ids[1] = short[0], long[0]
    mask = (torch.arange(17)[None, :] < torch.tensor([[5], [17]])).long()
    with torch.no_grad():
        alone = pool(tiny_model(short, torch.ones_like(short)), torch.ones_like(short))
        batched = pool(tiny_model(ids, mask), mask)
    torch.testing.assert_close(batched[0:1], alone, atol=1e-5, rtol=0)


def test_matryoshka_truncates_features_then_normalises(tiny_model, batch):
    ids, mask = batch
    with torch.no_grad():
        h = tiny_model(ids, mask)
    full = pool(h, mask)
    small = pool(h, mask, dim=16)
    assert small.shape == (2, 16)
    torch.testing.assert_close(small.norm(dim=-1), torch.ones(2))
    # truncating the unnormalised mean, not the normalised vector: same direction as full[:, :16]
    torch.testing.assert_close(small, torch.nn.functional.normalize(full[:, :16], dim=-1))


def test_eager_moe_op_equals_dense_masked_computation():
    """True top-k dispatch equals computing every expert for every token and masking with the gates."""
    g = torch.Generator().manual_seed(3)
    N, H, F, E, k = 97, 24, 40, 8, 2
    x = torch.randn(N, H, generator=g)
    router = torch.randn(E, H, generator=g) * 0.5
    w1, w2 = torch.randn(E, F, H, generator=g) / 5, torch.randn(E, F, H, generator=g) / 6
    bias = torch.randn(H, generator=g)
    for activation, act in {
        "gelu": lambda h: torch.nn.functional.gelu(h),
        "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
        "silu": torch.nn.functional.silu,
    }.items():
        for normalize in (False, True):
            got = moe(x, router, w1, w2, bias, k, activation, normalize)
            probs = (x @ router.T).softmax(-1)
            top = probs.topk(k, -1)
            gates = torch.zeros_like(probs).scatter(1, top.indices, top.values)  # (N, E), zero off the top-k
            if normalize:
                gates = gates / gates.sum(-1, keepdim=True)
            every = torch.stack([act(x @ w1[e].T) @ w2[e] for e in range(E)])  # (E, N, H)
            dense = torch.einsum("ne,enh->nh", gates, every) + bias
            torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


def test_moe_op_with_an_expert_that_gets_no_token():
    g = torch.Generator().manual_seed(4)
    N, H, F, E = 10, 8, 12, 4
    x = torch.randn(N, H, generator=g)
    router = torch.zeros(E, H)
    router[0, 0] = router[1, 0] = 50.0  # x[:,0] > 0 -> experts 0,1; else 2,3 get the lowest logits
    router[2, 0] = router[3, 0] = -50.0
    x[:, 0] = x[:, 0].abs() + 0.1  # every token prefers experts 0 and 1; 2 and 3 see no token
    w1, w2 = torch.randn(E, F, H, generator=g), torch.randn(E, F, H, generator=g)
    bias = torch.zeros(H)
    got = moe(x, router, w1, w2, bias, 2, "gelu", False)
    probs = (x @ router.T).softmax(-1)
    want = sum(probs[:, e : e + 1] * (torch.nn.functional.gelu(x @ w1[e].T) @ w2[e]) for e in (0, 1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
