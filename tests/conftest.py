"""Shared fixtures: tiny random checkpoints written through the real writer and loader paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nomic_export.exporter.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint (hidden 64, 4 layers, 8 experts, top-2). Treat it as read-only."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture
def tiny_copy(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, for tests that break it."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from nomic_export.exporter.checkpoint import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported with all three variants and verified. Treat it as read-only."""
    from nomic_export.exporter.export import export

    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    export(str(tiny_checkpoint), out, variants=("moe", "ortmoe", "dense"))
    return out
