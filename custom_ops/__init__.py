"""The ``com.nomic::MoE`` ONNX Runtime operator: names, and building and finding its library.

The op's specification is ``custom_ops/README.md``; ``moe_op.cc`` holds the kernel. The names below are
defined once here and once in ``moe_op.cc`` (STYLE.md rule 4). Everything except :func:`build` is
torch-free, so the runtime can call :func:`get_library_path`.

Example:
    >>> from nomic_export import custom_ops
    >>> import onnxruntime as ort
    >>> options = ort.SessionOptions()
    >>> options.register_custom_ops_library(custom_ops.get_library_path())
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from nomic_export.errors import UserError
from nomic_export.layout import LIBRARY_NAME

logger = logging.getLogger(__name__)

DOMAIN = "com.nomic"
OP_TYPE = "MoE"
OP_VERSION = 1
ATTR_TOP_K = "top_k"  # int, default 2, 1 <= top_k <= E
ATTR_ACTIVATION = "activation"  # string, default "gelu"
ATTR_NORMALIZE = "normalize_routing_weights"  # int 0/1, default 0: raw top-k probabilities
ACTIVATIONS = ("gelu", "gelu_tanh", "silu")  # "gelu" is the exact erf GELU
DEFAULT_TOP_K = 2
DEFAULT_ACTIVATION = "gelu"
DEFAULT_NORMALIZE = 0
INPUT_NAMES = ("X", "router_weight", "w1", "w2", "bias")  # bias is optional: "" in the node
OUTPUT_NAMES = ("Y",)
# The ORT C API version the library is built against; it runs on onnxruntime >= 1.21 (SPEC.md section 4).
ORT_API_VERSION = 21

# Environment variables.
ENV_CACHE = "NOMIC_EXPORT_CACHE"  # cache root, default ~/.cache/nomic_export
ENV_LIBRARY = "NOMIC_EXPORT_MOE_LIBRARY"  # use this library file instead of the cached build (e.g. ASan)
ENV_ORT_INCLUDE = "ORT_INCLUDE_DIR"  # a folder holding onnxruntime_cxx_api.h

SOURCES = ("moe_op.cc",)
_HEADER = "onnxruntime_cxx_api.h"
# Portable code: no -march, so the library runs on any x86-64. The fp16 conversions pick F16C at run time
# and the GEMM micro-kernel picks AVX-512, AVX2+FMA or baseline at load (__builtin_cpu_supports).
# -fopenmp-simd only honours `omp simd` pragmas: no OpenMP runtime is linked.
_CFLAGS = ("-O3", "-std=c++17", "-fopenmp-simd", "-fvisibility=hidden", "-Wall", "-Wextra")
_ASAN_CFLAGS = ("-O1", "-g", "-std=c++17", "-fopenmp-simd", "-fsanitize=address", "-fno-omit-frame-pointer", "-Wall")
# cpp_extension links -lc10 -ltorch ... with no rpath; --as-needed drops them, so the library needs only
# the C/C++ runtime (SPEC.md section 4).
_LDFLAGS = ("-Wl,--as-needed", "-lstdc++")
_ASAN_LDFLAGS = ("-fsanitize=address", "-Wl,--as-needed", "-lstdc++")
_DEBIAN_SUITE = "trixie"
_DEBIAN_PACKAGE = "libonnxruntime-dev"
_DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def cache_dir() -> Path:
    """The cache root: ``$NOMIC_EXPORT_CACHE`` or ``~/.cache/nomic_export``."""
    root = os.environ.get(ENV_CACHE)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "nomic_export"


def _source_dir() -> Path:
    return Path(__file__).resolve().parent


def _build_key(asan: bool) -> str:
    """A hash of the sources and flags: a change to either gives a new cache entry, hence a rebuild."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (_source_dir() / name).read_bytes() + b"\0")
    cflags, ldflags = (_ASAN_CFLAGS, _ASAN_LDFLAGS) if asan else (_CFLAGS, _LDFLAGS)
    digest.update(json.dumps([cflags, ldflags, ORT_API_VERSION]).encode())
    return digest.hexdigest()[:16]


def _library_target(asan: bool) -> Path:
    variant = "asan" if asan else "release"
    return cache_dir() / "ops" / f"{variant}-{_build_key(asan)}" / LIBRARY_NAME


def get_library_path(asan: bool = False) -> str:
    """Path of the built op library for the current sources, for ``register_custom_ops_library``.

    ``$NOMIC_EXPORT_MOE_LIBRARY`` overrides the cache (the ASan test run uses it). Torch-free.

    Args:
        asan: the AddressSanitizer build instead of the release one.

    Returns:
        The absolute path of ``libnomic_moe_ops.so``.

    Raises:
        UserError: no library is built for the current sources.

    Example:
        >>> options.register_custom_ops_library(get_library_path())
    """
    override = os.environ.get(ENV_LIBRARY)
    if override and not asan:
        if not Path(override).is_file():
            raise UserError(f"${ENV_LIBRARY} is {override!r}, which is not a file; unset it or build the library")
        return str(Path(override).resolve())
    target = _library_target(asan)
    if not target.is_file():
        command = "python -m nomic_export.custom_ops --asan" if asan else "nomic-export build-ops"
        raise UserError(f"the {DOMAIN}::{OP_TYPE} op library is not built for these sources ({target}); run `{command}`")
    return str(target)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock file, so that concurrent builds or header fetches wait for each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(verbose: bool = False, force: bool = False, asan: bool = False) -> str:
    """Build the op library with ``torch.utils.cpp_extension`` unless the cache has it; return its path.

    The build runs in a subprocess (cpp_extension loads what it builds, and the library does not belong in
    the caller's process), into a temporary folder renamed into the cache, under a lock.

    Args:
        verbose: show the compiler's command lines and output.
        force: rebuild even when the cache holds a library for the current sources.
        asan: build with AddressSanitizer into a separate cache entry (see README.md for running tests on it).

    Returns:
        The absolute path of the library.

    Raises:
        UserError: no ONNX Runtime headers could be found or fetched, or the compiler failed.

    Example:
        >>> path = build()
    """
    target = _library_target(asan)
    if target.is_file() and not force:
        return str(target)
    include_dir = find_ort_include_dir()
    with _locked(cache_dir() / "ops" / ".build.lock"):
        if target.is_file() and not force:
            return str(target)
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent.parent, prefix=".build-") as tmp:
            name = f"nomic_moe_ops_{_build_key(asan)}"
            spec = {
                "name": name,
                "sources": [str(_source_dir() / s) for s in SOURCES],
                "cflags": list(_ASAN_CFLAGS if asan else _CFLAGS),
                "ldflags": list(_ASAN_LDFLAGS if asan else _LDFLAGS),
                "include": str(include_dir),
                "build_dir": tmp,
                "verbose": verbose,
            }
            env = dict(os.environ)
            if asan:  # cpp_extension dlopens its result; an ASan library needs the runtime loaded first
                env["LD_PRELOAD"] = _asan_runtime()
                env["ASAN_OPTIONS"] = "detect_leaks=0"
            logger.info("building %s::%s op library (%s), about a minute", DOMAIN, OP_TYPE, "asan" if asan else "release")
            result = subprocess.run(
                [sys.executable, "-c", "import sys, json; from nomic_export.custom_ops import _compile; "
                 "_compile(json.loads(sys.argv[1]))", json.dumps(spec)],
                env=env, capture_output=not verbose, text=True,
            )
            if result.returncode != 0:
                detail = (result.stderr or "")[-4000:] if not verbose else "(see the output above)"
                raise UserError(f"building the op library failed:\n{detail}\nRetry with --verbose to see the compiler.")
            built = Path(tmp) / f"{name}.so"
            staged = Path(tmp) / LIBRARY_NAME
            shutil.copy2(built, staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)  # atomic: readers see the old file or the whole new one
    return str(target)


def _compile(spec: dict) -> None:
    """Runs in the build subprocess: the one place that imports torch."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=spec["name"],
        sources=spec["sources"],
        extra_cflags=spec["cflags"],
        extra_ldflags=spec["ldflags"],
        extra_include_paths=[spec["include"]],
        build_directory=spec["build_dir"],
        verbose=spec["verbose"],
        is_python_module=False,
    )


def _asan_runtime() -> str:
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not path or not Path(path).exists():
        raise UserError("the ASan build needs gcc's libasan; install it (Debian: apt-get install libasan8)")
    return path


# ---- ONNX Runtime headers ----


def find_ort_include_dir() -> Path:
    """A folder holding ``onnxruntime_cxx_api.h``: ``$ORT_INCLUDE_DIR``, the system's, or Debian's, cached.

    The onnxruntime wheels ship no headers (SPEC.md section 4). The last resort downloads Debian trixie's
    ``libonnxruntime-dev`` through this machine's own configured Debian mirror into the cache.

    Returns:
        The include folder.

    Raises:
        UserError: none found and the download failed; the message says what to install or set.
    """
    env = os.environ.get(ENV_ORT_INCLUDE)
    if env:
        for candidate in (Path(env), Path(env) / "onnxruntime"):
            if (candidate / _HEADER).is_file():
                return candidate
        raise UserError(f"${ENV_ORT_INCLUDE} is {env!r}, which holds no {_HEADER}; point it at ONNX Runtime's include folder")
    for root in ("/usr/include", "/usr/local/include"):
        for candidate in (Path(root) / "onnxruntime", Path(root) / "onnxruntime" / "core" / "session", Path(root)):
            if (candidate / _HEADER).is_file() and _api_version(candidate) >= ORT_API_VERSION:
                return candidate
    cached = _cached_debian_headers()
    if cached is not None:
        return cached
    try:
        return _fetch_debian_headers()
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise UserError(
            f"no ONNX Runtime C/C++ headers (API >= {ORT_API_VERSION}) found, and fetching Debian {_DEBIAN_SUITE}'s "
            f"{_DEBIAN_PACKAGE} failed: {err}. Set ${ENV_ORT_INCLUDE} to a folder holding {_HEADER} "
            f"(e.g. from an onnxruntime >= 1.21 release archive), or install {_DEBIAN_PACKAGE} (>= 1.21)."
        ) from err


def _api_version(include_dir: Path) -> int:
    text = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace") if (include_dir / "onnxruntime_c_api.h").is_file() else ""
    for line in text.splitlines():
        if line.startswith("#define ORT_API_VERSION "):
            return int(line.split()[2])
    return 0


def _headers_root() -> Path:
    return cache_dir() / "ort-headers"


def _cached_debian_headers() -> Path | None:
    for stamp in sorted(_headers_root().glob("*/SHA256")):
        include = stamp.parent / "usr" / "include" / "onnxruntime"
        if (include / _HEADER).is_file():
            return include
    return None


def debian_mirror() -> str:
    """The URI of this machine's configured Debian archive, read from apt's sources (never hard-coded)."""
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if line and not line.startswith("#") and ":" in line:
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                    for uri in fields.get("uris", "").split():
                        entries.append((uri, fields.get("suites", "").split()))
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    words = [w for w in words[1:] if not w.startswith("[") and not w.endswith("]") and "=" not in w]
                    if len(words) >= 2:
                        entries.append((words[0], words[1:2]))
    for uri, suites in entries:
        # the main archive: a ".../debian" path carrying a release suite, not the security archive
        if uri.rstrip("/").endswith("/debian") and any("security" not in s for s in suites):
            return uri.rstrip("/")
    raise ValueError("no Debian archive (a 'deb' entry whose URI ends in /debian) in /etc/apt/sources.list*")


def _fetch_debian_headers() -> Path:
    """Download and unpack ``libonnxruntime-dev`` from the trixie suite with a private apt state."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ValueError("apt-get and dpkg-deb are needed to fetch Debian's headers (not a Debian-like system)")
    mirror = debian_mirror()
    root = _headers_root()
    with _locked(root / ".fetch.lock"):
        cached = _cached_debian_headers()
        if cached is not None:
            return cached
        apt = root / "apt"
        for sub in ("state/lists/partial", "cache/archives/partial", "etc"):
            (apt / sub).mkdir(parents=True, exist_ok=True)
        signed_by = f"[signed-by={_DEBIAN_KEYRING}] " if Path(_DEBIAN_KEYRING).is_file() else ""
        (apt / "etc" / "sources.list").write_text(f"deb {signed_by}{mirror} {_DEBIAN_SUITE} main\n")
        options = [
            f"-oDir::State={apt / 'state'}",
            "-oDir::State::status=/dev/null",
            f"-oDir::Cache={apt / 'cache'}",
            f"-oDir::Etc::SourceList={apt / 'etc' / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null",
            "-oDebug::NoLocking=1",
            "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oAPT::Sandbox::User=",
        ]
        logger.info("fetching %s from %s %s (ONNX Runtime headers)", _DEBIAN_PACKAGE, mirror, _DEBIAN_SUITE)
        _run(["apt-get", "-q", *options, "update"])
        show = _run(["apt-cache", *options, "show", _DEBIAN_PACKAGE])
        stanza = show.split("\n\n")[0]
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        version, expected = fields.get("Version"), fields.get("SHA256")
        if not version or not expected:
            raise ValueError(f"apt's index for {_DEBIAN_SUITE} has no {_DEBIAN_PACKAGE} with a SHA256")
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            _run(["apt-get", "-q", *options, "download", f"{_DEBIAN_PACKAGE}={version}"], cwd=tmp)
            (deb,) = Path(tmp).glob("*.deb")
            actual = hashlib.sha256(deb.read_bytes()).hexdigest()
            if actual != expected:
                raise ValueError(f"{deb.name}: sha256 {actual} but the signed index says {expected}")
            unpacked = Path(tmp) / "x"
            _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
            include = unpacked / "usr" / "include" / "onnxruntime"
            if _api_version(include) < ORT_API_VERSION:
                raise ValueError(f"{deb.name} has no {_HEADER} with ORT_API_VERSION >= {ORT_API_VERSION}")
            (unpacked / "SHA256").write_text(f"{actual}  {deb.name}\n")
            final = root / f"{_DEBIAN_PACKAGE}_{version}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(unpacked, final)
        return final / "usr" / "include" / "onnxruntime"


def _run(command: list[str], cwd: str | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"`{' '.join(command)}` failed: {result.stderr.strip()[-1500:]}")
    return result.stdout
