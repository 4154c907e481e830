"""One way to name a model, everywhere, and what a model folder says about itself.

``model_name`` resolves, in this order: ``published/<name>`` (models/published), a folder of
models/base, a path inside the workspace, then a Hub repo id found in the Hugging Face cache.
Facts (type, parameters, quantization, context) are read from the files, never from the name.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.workspace import Workspace, check_name, outside_error

WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True, slots=True)
class ModelRef:
    name: str
    path: Path
    source: str  # published | base | path | hub-cache


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _cached_snapshot(repo_id: str) -> Path | None:
    """The newest local snapshot of ``repo_id`` in the HF cache, without any network call."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    try:
        ref = repo_dir / "refs" / "main"
        if ref.is_file():
            snapshot = repo_dir / "snapshots" / ref.read_text().strip()
            if snapshot.is_dir():
                return snapshot
        snapshots = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:  # a name too long for the file system is simply not in the cache
        return None
    return snapshots[0] if snapshots else None


def resolve_model(name: str, workspace: Workspace, *, field: str = "model_name") -> ModelRef:
    """The model ``name`` means, or a ``ForgeError`` naming ``field``: 400 for a name that cannot
    be a path, 403 for one that leads outside the workspace (``..``, an absolute path elsewhere, a
    symlink out, even from models/base/), 404 ``MODEL_NOT_FOUND`` listing the places searched."""
    searched: list[str] = []
    if not name.strip():
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"'{field}' is empty", details={"field": field})
    check_name(name, field)
    if name.startswith("published/"):
        path = workspace.resolve(str(Path("models") / name), field=field)
        searched.append(workspace.relative(workspace.published) + "/")
        # Exactly one folder of models/published: "published/../base/x" is not a published model.
        if is_model_dir(path) and path.parent == Path(os.path.realpath(workspace.published)):
            return ModelRef(name, path, "published")
    else:
        base = workspace.base_models / name
        searched.append(workspace.relative(workspace.base_models) + "/")
        if "/" not in name and name not in (".", "..") and is_model_dir(base):
            if not workspace.contains(base):
                raise outside_error(field, name, "is a link in models/base that points outside the workspace")
            return ModelRef(name, base.resolve(), "base")
        escape: ForgeError | None = None
        try:
            path: Path | None = workspace.resolve(name, field=field, allow_absolute=True)
        except ForgeError as exc:
            if exc.code != ErrorCode.PATH_OUTSIDE_WORKSPACE:
                raise
            path, escape = None, exc
        searched.append("workspace paths")
        if path is not None and is_model_dir(path):
            return ModelRef(name, path, "path")
        if name.count("/") == 1 and not name.startswith((".", "/")):
            searched.append(str(hf_cache_dir()) + "/")
            snapshot = _cached_snapshot(name)
            if snapshot is not None and is_model_dir(snapshot):
                return ModelRef(name, snapshot, "hub-cache")
        if escape is not None:  # not a Hub id either: say why it was not looked at
            raise escape
    raise ForgeError(
        ErrorCode.MODEL_NOT_FOUND, "Model not found",
        details={"field": field, "model_name": name, "searched_paths": searched},
        suggestion=(f"Download the model using: forgellm models pull {name}" if name.count("/") == 1
                    else "Import one with 'forgellm models import-gguf' or 'forgellm models fetch-demo'."),
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    return bool(read_json(path / "tokenizer_config.json").get("chat_template"))


def model_type(path: Path) -> str:
    """"instruct" when the tokenizer ships a chat template, else "base"."""
    return "instruct" if has_chat_template(path) else "base"


def tree_size(path: Path, limit: int = 200_000) -> int:
    """Bytes under ``path`` (following file symlinks, as the HF cache uses them)."""
    return tree_stats(path, limit)[0]


def tree_stats(path: Path, limit: int = 200_000) -> tuple[int, int]:
    """(bytes, files) under ``path``; directory symlinks are not followed, so a link cannot
    lead the walk out of the tree (or round in a loop)."""
    total, files, seen = 0, 0, 0
    stack = [path]
    while stack and seen < limit:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    total += entry.stat().st_size
                    files += 1
            except OSError:
                continue
    return total, files


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path.name}: implausible safetensors header")
        return json.loads(handle.read(length))


@dataclass(slots=True)
class ModelFacts:
    architecture: str | None
    parameters: int
    quantization: str
    context_length: int | None
    type: str
    size_bytes: int


_DTYPE_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def model_facts(path: Path) -> ModelFacts:
    """What the files say: weights' shapes give the parameter count (packed quantized weights
    are unpacked by their bit width), the config gives quantization, architecture, context."""
    config = read_json(path / "config.json")
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    parameters = 0
    dtypes: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        header = safetensors_header(file)
        quantized_prefixes = {name[: -len(".scales")] for name in header if name.endswith(".scales")}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            prefix = name.rsplit(".", 1)[0]
            if prefix in quantized_prefixes:
                if name.endswith((".scales", ".biases")):
                    continue
                if bits and info["dtype"] == "U32":
                    count = count * 32 // bits
            parameters += count
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
    if bits:
        quantization = f"{bits}-bit (group size {quant.get('group_size', '?')})"
    elif dtypes:
        main = max(dtypes, key=dtypes.get)
        quantization = _DTYPE_NAMES.get(main, main.lower())
    else:
        quantization = "unknown"
    architectures = config.get("architectures") or []
    architecture = config.get("model_type") or (architectures[0] if architectures else None)
    context = config.get("max_position_embeddings") or config.get("max_sequence_length")
    return ModelFacts(architecture, parameters, quantization, context, model_type(path), tree_size(path))


def human_count(parameters: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            value = parameters / scale
            return f"~{value:.0f}{unit}" if value >= 10 else f"~{value:.1f}{unit}".replace(".0", "")
    return str(parameters)
