"""Full-size cases (1.9 GB checkpoint): run with ``python -m pytest -m slow``; excluded from the default run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nomic_export.exporter.checkpoint import load_model
from nomic_export.exporter.random_checkpoint import write_random_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("full") / "full", preset="full", seed=0)


def test_full_preset_has_the_real_tensors(full_checkpoint):
    with safe_open(full_checkpoint / "model.safetensors", framework="np") as f:
        shapes = [f.get_slice(name).get_shape() for name in f.keys()]
    assert len(shapes) == 148
    assert sum(int(np.prod(s)) for s in shapes) == 475_292_928


def test_reference_runs_a_batch_of_8x128(full_checkpoint):
    model = load_model(full_checkpoint)
    ids = torch.randint(4, 250_000, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model(ids, torch.ones_like(ids))
    assert h.shape == (8, 128, 768) and torch.isfinite(h).all()
