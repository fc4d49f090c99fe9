"""Checkpoint resolution and strict loading: every bad input gets a clear error naming the file and value."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from nomic_export.errors import UserError
from nomic_export.exporter.checkpoint import load_model, resolve_checkpoint, tensor_table
from nomic_export.exporter.model import NomicMoEConfig
from nomic_export.exporter.random_checkpoint import write_random_checkpoint


def edit_config(directory, **changes):
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_full_preset_has_the_real_tensor_count_and_parameters():
    table = tensor_table(NomicMoEConfig())  # the defaults are the real model's sizes
    assert len(table) == 148
    assert sum(int(np.prod(file_shape)) for file_shape, _ in table.values()) == 475_292_928


def test_tiny_checkpoint_loads_strictly(tiny_checkpoint, tiny_model):
    assert tiny_model.config.num_experts == 8 and tiny_model.config.hidden_size == 64
    names = set(load_file(str(tiny_checkpoint / "model.safetensors")))
    assert names == set(tiny_model.state_dict())


def test_equal_seeds_give_equal_checkpoints(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", seed=5)
    b = write_random_checkpoint(tmp_path / "b", seed=5)
    c = write_random_checkpoint(tmp_path / "c", seed=6)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_random_checkpoint_routes_tokens_to_every_expert(tiny_model):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, tiny_model.config.vocab_size - 1, (8, 64), generator=g)
    x = tiny_model.emb_ln(tiny_model.embeddings(ids)).reshape(-1, tiny_model.config.hidden_size)
    for layer in (1, 3):
        probs = (x @ tiny_model.encoder.layers[layer].mlp.router.layer.weight.T).softmax(-1)
        top = probs.topk(3, -1).values
        counts = torch.bincount(probs.topk(2, -1).indices.flatten(), minlength=8)
        assert (counts > 0).all(), counts
        # the 2nd and 3rd choice are rarely near-ties
        assert ((top[:, 1] - top[:, 2]) < 1e-3).float().mean() < 0.02


def test_tokenizer_is_xlmr_shaped(tiny_checkpoint):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.token_to_id("<mask>") == tok.get_vocab_size() - 1
    enc = tok.encode("search_query: Hello!")
    assert enc.ids[0] == 0 and enc.ids[-1] == 2
    assert tok.encode("").ids == [0, 2]
    cfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 512
    assert json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"] >= tok.get_vocab_size()


def test_existing_directory_is_refused_without_overwrite(tiny_copy):
    before = sorted(p.name for p in tiny_copy.iterdir())
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        write_random_checkpoint(tiny_copy)
    assert sorted(p.name for p in tiny_copy.iterdir()) == before


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("command", ["init-random", "export"])
def test_an_output_path_under_a_file_is_a_clear_error(tiny_checkpoint, tmp_path, capsys, command):
    from nomic_export.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    target = a_file / "out"
    if command == "init-random":
        argv = ["init-random", str(target), "--preset", "tiny"]
    else:
        argv = ["export", str(tiny_checkpoint), "-o", str(target), "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nomic-export {command}: error: ") and str(a_file) in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="no checkpoint directory"):
        resolve_checkpoint(tmp_path / "nope")


def test_v15_checkpoint_without_experts(tiny_copy):
    edit_config(tiny_copy, num_experts=..., moe_top_k=..., moe_every_n_layers=0)
    with pytest.raises(UserError, match=r"config\.json: no experts.*v1\.5"):
        load_model(tiny_copy)


def test_plain_bert_checkpoint(tiny_copy):
    edit_config(tiny_copy, model_type="bert")
    with pytest.raises(UserError, match=r"config\.json: model_type is 'bert'"):
        load_model(tiny_copy)


@pytest.mark.parametrize(
    "key,value",
    [
        ("prenorm", True),
        ("activation_function", "gelu_new"),
        ("activation_function", "swiglu"),
        ("rotary_emb_interleaved", True),
        ("moe_normalize_expert_weights", True),
        ("num_shared_experts", 1),
    ],
)
def test_config_values_this_family_never_uses_are_refused(tiny_copy, key, value):
    edit_config(tiny_copy, **{key: value})
    with pytest.raises(UserError, match=rf"config\.json: {key}={value!r}.*refuses"):
        load_model(tiny_copy)


def test_missing_unexpected_and_misshaped_tensors_listed_sorted(tiny_copy):
    def edit(t):
        del t["encoder.layers.3.mlp.experts.bias"], t["emb_ln.bias"]
        t["encoder.layers.1.mlp.router.bias"] = np.zeros(8, np.float32)  # routers have no bias
        t["encoder.layers.1.mlp.experts.mlp.w2"] = np.zeros((64, 8 * 128), np.float32)  # [H, E*F]: wrong

    edit_tensors(tiny_copy, edit)
    with pytest.raises(UserError) as err:
        load_model(tiny_copy)
    message = str(err.value)
    assert "model.safetensors" in message
    assert message.index("emb_ln.bias") < message.index("encoder.layers.3.mlp.experts.bias")
    assert "unexpected (1):\n    encoder.layers.1.mlp.router.bias  shape [8]" in message
    assert "encoder.layers.1.mlp.experts.mlp.w2  expected [1024, 64], found [64, 1024]" in message


def test_truncated_safetensors(tiny_copy):
    path = tiny_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file.*truncated or corrupt"):
        load_model(tiny_copy)


def test_corrupt_safetensors_header(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}" + b"\0" * 64)
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model(tiny_copy)


def test_no_tokenizer_json(tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"tokenizer\.json: missing"):
        resolve_checkpoint(tiny_copy)


def test_pickled_weights_are_never_loaded(tiny_copy):
    (tiny_copy / "model.safetensors").rename(tiny_copy / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*pickled weights are never loaded"):
        load_model(tiny_copy)


def test_sharded_checkpoint_loads(tiny_copy, tiny_model):
    tensors = load_file(str(tiny_copy / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tiny_copy / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    (tiny_copy / "model.safetensors").unlink()
    model = load_model(tiny_copy)
    for name, value in tiny_model.state_dict().items():
        assert np.array_equal(model.state_dict()[name].numpy(), value.numpy()), name
