"""MLX runtime set-up that must happen before ``mlx.core`` is imported.

On Linux the ``mlx[cpu]`` wheel links a bundled reference (netlib) BLAS: a 1024x1024 fp32 matmul
takes ~350 ms there, against ~11 ms with OpenBLAS on the same 2-core machine (~30x). ``libmlx.so``
resolves ``cblas_sgemm`` & co. through the global symbol scope first, so loading an OpenBLAS with
``RTLD_GLOBAL`` before ``mlx.core`` is imported makes MLX use it.

Only a library exporting the plain CBLAS names works. The OpenBLAS builds shipped inside numpy
(``numpy.libs/libscipy_openblas64_*.so``) and the ``scipy-openblas32``/``scipy-openblas64`` wheels
prefix their symbols (``scipy_cblas_sgemm``) and give no speed-up. What works is Debian's
``libopenblas0-pthread`` (``apt-get install libopenblas0-pthread``) or the ``cmeel-openblas`` wheel
(which itself needs the system ``libgfortran5``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import sysconfig
import threading

import structlog

log = structlog.get_logger(__name__)

_ENV_VAR = "FORGELLM_BLAS_PATH"
_DISABLE_VALUES = {"0", "none", "off", "bundled", "false"}
_SYSTEM_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblaso.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

_lock = threading.Lock()
_result: str | None = None
_handle: ctypes.CDLL | None = None  # keep the library loaded for the life of the process


def _pip_candidates() -> list[str]:
    """OpenBLAS builds with plain CBLAS names installed by pip (cmeel-openblas)."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], sys.prefix}
    found: list[str] = []
    for root in roots:
        for pattern in ("cmeel.prefix/lib/libopenblas.so.0", "cmeel.prefix/lib/libopenblas.so"):
            found.extend(sorted(glob.glob(os.path.join(root, pattern))))
    return found


def _candidates() -> list[str]:
    found: list[str] = []
    name = ctypes.util.find_library("openblas")
    if name:
        found.append(name)
    found.extend(p for p in _SYSTEM_PATHS if os.path.exists(p))
    found.extend(_pip_candidates())
    seen: set[str] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


def _try_load(path: str) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.debug("blas.load_failed", path=path, error=str(exc))
        return None
    if not hasattr(lib, "cblas_sgemm"):  # prefixed builds (scipy_cblas_sgemm) do not help MLX
        log.debug("blas.no_cblas_symbols", path=path)
        return None
    return lib


def _describe(path: str, lib: ctypes.CDLL) -> str:
    desc = f"openblas {path}"
    try:
        get_config = lib.openblas_get_config
        get_config.restype = ctypes.c_char_p
        desc += f" ({get_config().decode(errors='replace').strip()})"
    except (AttributeError, OSError):
        pass
    return desc


def preload_blas() -> str:
    """Load an optimised OpenBLAS globally so ``mlx.core`` uses it; return what is in use.

    Call before the first ``import mlx.core``. Idempotent: later calls return the first answer.
    ``FORGELLM_BLAS_PATH`` names a library to use (or ``none`` to keep MLX's bundled BLAS).
    No-op on macOS, where MLX uses Accelerate.
    """
    global _result, _handle
    with _lock:
        if _result is not None:
            return _result
        _result = _preload()
        return _result


def _preload() -> str:
    global _handle
    if sys.platform == "darwin":
        return "accelerate (macOS)"
    if not sys.platform.startswith("linux"):
        return f"bundled (platform {sys.platform})"
    late = "mlx.core" in sys.modules
    if late:
        log.warning("blas.preload_too_late", hint="call preload_blas() before importing mlx.core")
    requested = os.environ.get(_ENV_VAR, "").strip()
    if requested.lower() in _DISABLE_VALUES:
        log.info("blas.selected", blas="bundled", reason=f"{_ENV_VAR}={requested}")
        return "bundled (disabled by FORGELLM_BLAS_PATH)"
    if requested:
        lib = _try_load(requested)
        if lib is None:
            log.warning("blas.requested_unusable", path=requested)
        else:
            _handle = lib
            desc = _describe(requested, lib)
            log.info("blas.selected", blas=desc, late=late)
            return desc
    for path in _candidates():
        lib = _try_load(path)
        if lib is not None:
            _handle = lib
            desc = _describe(path, lib)
            log.info("blas.selected", blas=desc, late=late)
            return desc
    log.warning(
        "blas.bundled",
        hint="MLX CPU matmuls are ~30x slower with the bundled BLAS; "
        "install OpenBLAS: apt-get install libopenblas0-pthread",
    )
    return "bundled (no OpenBLAS found; apt-get install libopenblas0-pthread)"


__all__ = ["preload_blas"]
