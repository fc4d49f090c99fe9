"""Non-Python loading: a C program on ORT's C API registers the op library and reproduces the Python runtime.

This is the path Rust ``ort`` (``SessionBuilder::with_operator_library``) and C++ users take: the same
``RegisterCustomOpsLibrary_V2`` call, the same ``libonnxruntime.so``. The program is compiled here with gcc
against Debian's ORT headers (the wheels ship none, SPEC.md section 4) and the library the onnxruntime wheel
ships, so it runs on exactly the runtime the Python side uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from nomic_export.custom_ops import find_ort_include_dir
from nomic_export.layout import MAX_TOKENS
from nomic_export.runtime import MoETextEmbedding

# fp32, same graph, same kernels, same runtime library: only thread scheduling could differ (both use 1 thread).
C_API_ATOL = 1e-5
SOURCE = Path(__file__).with_name("c_api_embed.c")
TEXTS = ["Hello!", "", "search_document: ¡Hola! ¿Cómo estás?", "token " * (2 * MAX_TOKENS), "東京は日本の首都です。"]


def wheel_libonnxruntime() -> Path:
    """The ``libonnxruntime.so.<version>`` inside the installed onnxruntime wheel."""
    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so.*"))
    if not found:
        raise FileNotFoundError(f"no libonnxruntime.so.* in {capi}; is onnxruntime installed from a wheel?")
    return found[-1]


@pytest.fixture(scope="module")
def c_program(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is needed to compile tests/c_api_embed.c (it also builds the op library)")
    build = tmp_path_factory.mktemp("c_api")
    # The wheel names the file libonnxruntime.so.1.<minor>.<patch>, but its soname is libonnxruntime.so.1:
    # a link of that name beside the program lets the loader find it through the rpath.
    os.symlink(wheel_libonnxruntime(), build / "libonnxruntime.so.1")
    program = build / "c_api_embed"
    command = [
        "gcc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{find_ort_include_dir()}",
        str(SOURCE), "-o", str(program), str(build / "libonnxruntime.so.1"), f"-Wl,-rpath,{build}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    return program


def run_c(program: Path, model: Path, library: Path, ids: np.ndarray, mask: np.ndarray, tmp: Path) -> np.ndarray:
    inputs, output = tmp / "inputs.bin", tmp / "hidden.bin"
    with open(inputs, "wb") as handle:
        np.array(ids.shape, dtype=np.int64).tofile(handle)
        ids.astype(np.int64).tofile(handle)
        mask.astype(np.int64).tofile(handle)
    command = [str(program), str(model), str(library), str(inputs), str(output)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    batch, seq, hidden = map(int, result.stdout.split())
    assert (batch, seq) == ids.shape
    return np.fromfile(output, dtype=np.float32).reshape(batch, seq, hidden)


def test_c_program_reproduces_the_python_runtime(c_program, tiny_export, tmp_path):
    model = MoETextEmbedding(tiny_export, variant="moe", threads=1)
    batch = model.tokenize(TEXTS)
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    expected = model.session.run(["last_hidden_state"], feeds)[0]
    graph = tiny_export / "onnx" / "model.onnx"
    hidden = run_c(c_program, graph, model.op_library, batch.input_ids, batch.attention_mask, tmp_path)
    assert hidden.shape == expected.shape == (len(TEXTS), MAX_TOKENS, model.hidden_size)
    np.testing.assert_allclose(hidden, expected, atol=C_API_ATOL, rtol=0)


def test_c_program_reports_a_missing_library(c_program, tiny_export, tmp_path):
    ids = np.array([[0, 2]], dtype=np.int64)
    inputs = tmp_path / "inputs.bin"
    with open(inputs, "wb") as handle:
        np.array(ids.shape, dtype=np.int64).tofile(handle)
        ids.tofile(handle)
        np.ones_like(ids).tofile(handle)
    model = tiny_export / "onnx" / "model.onnx"
    command = [str(c_program), str(model), str(tmp_path / "missing.so"), str(inputs), str(tmp_path / "o.bin")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1
    assert "RegisterCustomOpsLibrary_V2 failed" in result.stderr
