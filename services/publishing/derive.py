"""New published models made from a published one: a quantized copy, or a GGUF file.

Both are written under a temporary name and renamed when complete, like a publish.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from forgellm.schemas import ErrorCode
from forgellm.services.common.errors import ForgeError, disk_full_error, is_disk_full
from forgellm.services.common.models import read_json
from forgellm.services.common.workspace import Workspace
from forgellm.services.modelio.gguf import _GLOBAL_NAMES, _LAYER_NAMES, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
_TO_GGUF = {hf: gguf for gguf, hf in _LAYER_NAMES.items()}
_GLOBAL_TO_GGUF = {hf: gguf for gguf, hf in _GLOBAL_NAMES.items()}


def quantize_published(ws: Workspace, model_dir: Path, bits: int, group_size: int) -> Path:
    """``published/<name>`` → ``published/<name>_q<bits>g<group>``, loadable with mlx_lm.load."""
    import mlx_lm
    from mlx_lm.utils import quantize_model, save_config, save_model

    if bits not in BITS:
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"bits must be one of {BITS}", details={"field": "bits"})
    if group_size not in GROUP_SIZES:
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"group_size must be one of {GROUP_SIZES}",
                         details={"field": "group_size"})
    config = read_json(model_dir / "config.json")
    if config.get("quantization"):
        raise ForgeError(ErrorCode.INVALID_REQUEST, "This model is already quantized", details={"field": "model_name"},
                         suggestion="Quantize the unquantized published model instead.")
    final = ws.published / f"{model_dir.name}_q{bits}g{group_size}"
    if final.exists():
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"Already quantized: published/{final.name}",
                         details={"path": ws.relative(final)})
    staging = ws.published / f".publishing-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model, tokenizer, config = mlx_lm.load(str(model_dir), return_config=True)
        model, config = quantize_model(model, config, group_size, bits)
        staging.mkdir(parents=True)
        save_model(staging, model, donate_model=True)
        save_config(config, config_path=staging / "config.json")
        tokenizer.save_pretrained(str(staging))
        for name in ("README.md", "training_dashboard.png", "publish.json", "generation_config.json"):
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, staging / name)
        meta = read_json(staging / "publish.json")
        meta.update(quantized_from=f"published/{model_dir.name}", bits=bits, group_size=group_size,
                    model_name=f"published/{final.name}")
        (staging / "publish.json").write_text(json.dumps(meta, indent=2))
        staging.rename(final)
    except BaseException as exc:
        full = is_disk_full(exc, ws.published)
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise disk_full_error(f"quantizing into {final.name}", ws.published, exc) from exc
        raise
    return final


def _gguf_name(hf_name: str) -> str:
    base, _, leaf = hf_name.rpartition(".")  # leaf: weight
    if base in _GLOBAL_TO_GGUF:
        return f"{_GLOBAL_TO_GGUF[base]}.{leaf}"
    parts = base.split(".")
    if parts[:2] == ["model", "layers"]:
        layer, rest = parts[2], ".".join(parts[3:])
        if rest in _TO_GGUF:
            return f"blk.{layer}.{_TO_GGUF[rest]}.{leaf}"
    raise ForgeError(ErrorCode.INVALID_REQUEST, f"Cannot export tensor {hf_name} to GGUF (not a llama layer)")


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k row order for RoPE (the inverse of the importer's un-permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if "Digits" in kinds and "ByteLevel" in kinds:
        return "smollm"
    return "gpt2"


def gguf_metadata(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ForgeError(ErrorCode.INVALID_REQUEST, "Only byte-level BPE tokenizers can be exported to GGUF here")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(max(vocab.values()) + 1, config.get("vocab_size", 0))
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TOKEN_NORMAL] * size
    for content, index in vocab.items():
        tokens[index] = content
        if content in added:
            types[index] = TOKEN_CONTROL if added[content].get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tokenizer_config = read_json(model_dir / "tokenizer_config.json")
    n_head = config["num_attention_heads"]
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": model_dir.name,
        "llama.context_length": mx.array(config.get("max_position_embeddings", 2048), dtype=mx.uint32),
        "llama.embedding_length": mx.array(config["hidden_size"], dtype=mx.uint32),
        "llama.block_count": mx.array(config["num_hidden_layers"], dtype=mx.uint32),
        "llama.feed_forward_length": mx.array(config["intermediate_size"], dtype=mx.uint32),
        "llama.attention.head_count": mx.array(n_head, dtype=mx.uint32),
        "llama.attention.head_count_kv": mx.array(config.get("num_key_value_heads", n_head), dtype=mx.uint32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config.get("rms_norm_eps", 1e-5), dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config.get("rope_theta", 10000.0), dtype=mx.float32),
        "llama.rope.dimension_count": mx.array(config.get("head_dim", config["hidden_size"] // n_head),
                                               dtype=mx.uint32),
        "llama.vocab_size": mx.array(size, dtype=mx.uint32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer_name(tokenizer_json),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.merges": merges,
    }
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown")):
        token = tokenizer_config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token in vocab:
            meta[f"tokenizer.ggml.{name}_token_id"] = mx.array(vocab[token], dtype=mx.uint32)
    template = tokenizer_config.get("chat_template")
    if not template and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def export_gguf(model_dir: Path, out_file: Path) -> Path:
    """Write a llama-family MLX model as an f16 GGUF (norms in f32) that llama.cpp, Ollama and
    ``forgellm models import-gguf`` read."""
    import mlx.core as mx

    config = read_json(model_dir / "config.json")
    if config.get("model_type") != "llama":
        raise ForgeError(ErrorCode.INVALID_REQUEST, f"GGUF export supports llama-family models, not "
                         f"{config.get('model_type')!r}", details={"field": "model_name"})
    if config.get("quantization"):
        raise ForgeError(ErrorCode.INVALID_REQUEST, "A quantized model cannot be exported to f16 GGUF",
                         details={"field": "model_name"}, suggestion="Export the unquantized published model.")
    weights: dict[str, Any] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    tensors = {}
    for name, value in weights.items():
        if name.endswith("self_attn.q_proj.weight"):
            value = _permute(value, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            value = _permute(value, n_kv)
        value = value.astype(mx.float32) if "norm" in name else value.astype(mx.float16)
        tensors[_gguf_name(name)] = value
    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".{out_file.name}.partial.gguf")
    try:
        mx.save_gguf(str(staging), tensors, gguf_metadata(model_dir, config))
        staging.rename(out_file)
    except BaseException as exc:
        full = is_disk_full(exc, out_file.parent)
        staging.unlink(missing_ok=True)
        if full:
            raise disk_full_error(f"exporting {out_file.name}", out_file.parent, exc) from exc
        raise
    return out_file
