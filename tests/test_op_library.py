"""The op library as a file: what it links, that it loads without torch, and its build cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from nomic_export import custom_ops
from nomic_export.errors import UserError

ALLOWED_NEEDED = {"libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2"}


@pytest.fixture(scope="module")
def library() -> str:
    return custom_ops.build()


def test_needs_only_the_c_and_cxx_runtime(library):
    if shutil.which("readelf") is None:
        pytest.fail("readelf (binutils) is needed to read the library's NEEDED entries")
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    needed = {line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line}
    assert needed <= ALLOWED_NEEDED, f"unexpected NEEDED entries: {sorted(needed - ALLOWED_NEEDED)}"


def test_runs_in_a_process_that_never_imports_torch(library):
    script = textwrap.dedent(
        """
        import sys
        import numpy as np, onnxruntime as ort
        from nomic_export.custom_ops import get_library_path, graphs
        options = ort.SessionOptions()
        options.register_custom_ops_library(get_library_path())
        sess = ort.InferenceSession(graphs.moe_node_model(8, 12, 3).SerializeToString(), options)
        rng = np.random.default_rng(0)
        feeds = {"X": rng.standard_normal((4, 8)), "router_weight": rng.standard_normal((3, 8)),
                 "w1": rng.standard_normal((3, 12, 8)), "w2": rng.standard_normal((3, 12, 8)),
                 "bias": rng.standard_normal(8)}
        (y,) = sess.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})
        assert y.shape == (4, 8) and np.isfinite(y).all()
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != custom_ops.ENV_LIBRARY}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_build_is_cached_and_keyed_by_sources(library, tmp_path, monkeypatch):
    assert custom_ops.build() == library == custom_ops.get_library_path()
    # a changed source means a new cache entry, which is not built yet
    sources = tmp_path / "src"
    sources.mkdir()
    for name in custom_ops.SOURCES:
        (sources / name).write_text(custom_ops._source_dir().joinpath(name).read_text() + "\n// changed\n")
    monkeypatch.setattr(custom_ops, "_source_dir", lambda: sources)
    with pytest.raises(UserError, match="nomic-export build-ops"):
        custom_ops.get_library_path()


def test_debian_mirror_is_read_from_apt_sources():
    if not os.path.exists("/etc/apt"):
        pytest.skip("not a Debian-like system")  # the header fetch is Debian-only by design
    mirror = custom_ops.debian_mirror()
    assert mirror.startswith(("http://", "https://", "file:/")) and mirror.endswith("/debian")


def test_bad_ort_include_dir_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv(custom_ops.ENV_ORT_INCLUDE, str(tmp_path))
    with pytest.raises(UserError, match="ORT_INCLUDE_DIR"):
        custom_ops.find_ort_include_dir()
