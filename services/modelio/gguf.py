"""Import a llama-family GGUF file as an MLX model folder that ``mlx_lm.load`` opens.

``mx.load(path, return_metadata=True)`` reads F32/F16 tensors as they are and the Q4_0, Q4_1 and
Q8_0 block formats as MLX affine-quantized triples (``name.weight`` packed uint32, ``name.scales``,
``name.biases``, group size 32). We dequantize those to float and write HF/mlx-lm names.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that its RoPE can rotate
adjacent pairs; mlx-lm's llama (like HF) rotates halves, so we undo that permutation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from forgellm.services.mlx_runtime import preload_blas

log = structlog.get_logger(__name__)

Progress = Callable[[str, float], None]

SUPPORTED_ARCHITECTURES = ("llama",)
GROUP_SIZE = 32  # every GGUF block format MLX reads (Q4_0, Q4_1, Q8_0) uses 32-element blocks

# ggml tensor type ids (ggml.h) -> names, for error messages.
GGML_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
}
SUPPORTED_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}

# token types in tokenizer.ggml.token_type (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer regexes for byte-level BPE vocabularies, keyed by tokenizer.ggml.pre (llama.cpp).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ModelImportError(ValueError):
    """The file cannot be imported (unsupported architecture, tensor type, tokenizer...)."""


# --------------------------------------------------------------------------- GGUF header


def read_tensor_types(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return ``{tensor name: ggml type name}`` from a GGUF header (no tensor data read)."""
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ModelImportError(f"{path}: truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def read_str() -> str:
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

        def skip_value(vtype: int) -> None:
            if vtype in scalar:
                f.seek(struct.calcsize(scalar[vtype]), os.SEEK_CUR)
            elif vtype == 8:
                f.seek(read("<Q"), os.SEEK_CUR)
            elif vtype == 9:
                item_type, count = read("<I"), read("<Q")
                if item_type in scalar:
                    f.seek(struct.calcsize(scalar[item_type]) * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip_value(item_type)
            else:
                raise ModelImportError(f"{path}: unknown GGUF metadata value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ModelImportError(f"{path} is not a GGUF file (bad magic)")
        version = read("<I")
        if version < 2:
            raise ModelImportError(f"{path}: GGUF version {version} is not supported (need 2 or later)")
        n_tensors, n_kv = read("<Q"), read("<Q")
        for _ in range(n_kv):
            read_str()
            skip_value(read("<I"))
        types: dict[str, str] = {}
        for _ in range(n_tensors):
            name = read_str()
            n_dims = read("<I")
            f.seek(8 * n_dims, os.SEEK_CUR)
            type_id = read("<I")
            read("<Q")  # offset
            types[name] = GGML_TYPES.get(type_id, f"type {type_id}")
        return types


# --------------------------------------------------------------------------- metadata helpers


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key not in meta:
        return default
    value = meta[key]
    if hasattr(value, "item"):
        return value.item()
    return value


def _required(meta: dict[str, Any], key: str) -> Any:
    value = _scalar(meta, key)
    if value is None:
        raise ModelImportError(f"GGUF metadata lacks {key!r}")
    return value


def _f32(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(f"{float(value):.7g}")


def _unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k row permutation (rows stored as (n_head, hd/2, 2), HF order is (n_head, 2, hd/2))."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if pre in ("smollm",):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):
        regex = _LLAMA3_REGEX
    elif pre in ("qwen2",):
        regex = _QWEN2_REGEX
    else:
        if pre not in ("default", "gpt2", ""):
            log.warning("gguf.unknown_pretokenizer", pre=pre, fallback="gpt2")
        regex = _GPT2_REGEX
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            byte_level,
        ]
    )


def build_tokenizer(meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Build a ``tokenizers.Tokenizer`` and a tokenizer_config dict from GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = _scalar(meta, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelImportError(
            f"tokenizer model {model!r} is not supported (only byte-level BPE, tokenizer.ggml.model='gpt2')"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ModelImportError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    token_types = meta.get("tokenizer.ggml.token_type")
    token_types = token_types.tolist() if token_types is not None else [TOKEN_NORMAL] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(str(_scalar(meta, "tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    special = [
        AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == TOKEN_CONTROL
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, t in enumerate(token_types)
        if t == TOKEN_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def token_for(key: str) -> str | None:
        idx = _scalar(meta, key)
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 2048)),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": [t.content for t in special],
    }
    for name, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        value = token_for(key)
        if value is not None:
            config[name] = value
    template = _scalar(meta, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    if config["add_bos_token"] and "bos_token" in config:
        bos = config["bos_token"]
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
                ),
            ]
        )
    return tok, config


# --------------------------------------------------------------------------- config + weights


def build_config(meta: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    arch = _scalar(meta, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    p = f"{arch}."
    hidden = int(_required(meta, p + "embedding_length"))
    n_head = int(_required(meta, p + "attention.head_count"))
    n_kv = int(_scalar(meta, p + "attention.head_count_kv", n_head))
    head_dim = int(_scalar(meta, p + "attention.key_length", hidden // n_head))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _scalar(meta, p + "vocab_size") or (len(tokens) if tokens else weights["token_embd.weight"].shape[0])
    if "rope_freqs.weight" in weights:
        raise ModelImportError("GGUF uses rope_freqs (Llama 3.1-style RoPE scaling), which is not supported yet")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_required(meta, p + "block_count")),
        "intermediate_size": int(_required(meta, p + "feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_scalar(meta, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_scalar(meta, p + "rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(_scalar(meta, p + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    scaling = _scalar(meta, p + "rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(_required(meta, p + "rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelImportError(f"RoPE scaling {scaling!r} is not supported")
    for name, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = _scalar(meta, key)
        if value is not None:
            config[name] = int(value)
    return config


def _hf_name(gguf_base: str) -> str:
    if gguf_base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_base]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", gguf_base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ModelImportError(f"unexpected tensor {gguf_base!r} in a llama GGUF")


def convert_weights(weights: dict[str, Any], config: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """GGUF tensors (possibly quantized triples) -> float tensors with mlx-lm llama names."""
    import mlx.core as mx

    out: dict[str, Any] = {}
    bases = sorted({k.rsplit(".", 1)[0] for k in weights})
    for base in bases:
        w = weights.get(base + ".weight")
        if w is None:
            raise ModelImportError(f"tensor {base!r} has no weight")
        scales = weights.get(base + ".scales")
        if scales is not None:
            in_features = scales.shape[-1] * GROUP_SIZE
            bits = w.shape[-1] * 32 // in_features
            if bits * in_features != w.shape[-1] * 32 or bits not in (2, 3, 4, 5, 6, 8):
                raise ModelImportError(f"tensor {base!r}: cannot infer bits from shapes {w.shape}/{scales.shape}")
            biases = weights.get(base + ".biases")
            # float32 scales/biases: with float16 ones MLX computes (and rounds) in float16
            w = mx.dequantize(
                w,
                scales.astype(mx.float32),
                None if biases is None else biases.astype(mx.float32),
                group_size=GROUP_SIZE,
                bits=bits,
            )
        elif not mx.issubdtype(w.dtype, mx.floating):
            raise ModelImportError(f"tensor {base!r} has unsupported dtype {w.dtype}")
        w = w.astype(dtype)
        if base.endswith(".attn_q"):
            w = _unpermute(w, config["num_attention_heads"])
        elif base.endswith(".attn_k"):
            w = _unpermute(w, config["num_key_value_heads"])
        out[_hf_name(base) + ".weight"] = w
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        expected.update(f"model.layers.{i}.{n}.weight" for n in _LAYER_NAMES.values())
    missing = sorted(expected - out.keys())
    if missing:
        raise ModelImportError(f"GGUF lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return out


def _default_dtype() -> Any:
    import mlx.core as mx

    # CPU matmuls in float16/bfloat16 have no BLAS path (~40x slower than float32 here).
    try:
        if mx.metal.is_available():
            return mx.float16
    except AttributeError:
        pass
    try:
        if mx.cuda.is_available():
            return mx.bfloat16
    except AttributeError:
        pass
    return mx.float32


# --------------------------------------------------------------------------- entry point


def _load_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import mlx.core as mx

    try:
        types = read_tensor_types(path)
    except OSError as exc:
        raise ModelImportError(f"cannot read {path}: {exc}") from exc
    bad = sorted({t for t in types.values() if t not in SUPPORTED_TYPES})
    if bad:
        names = [n for n, t in types.items() if t in bad][:3]
        raise ModelImportError(
            f"{path.name}: tensor type(s) {', '.join(bad)} not supported (e.g. {', '.join(names)}); "
            f"supported: {', '.join(sorted(SUPPORTED_TYPES))}"
        )
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelImportError(f"cannot load {path.name}: {exc}") from exc


def import_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    dtype: Any = None,
    source: str | None = None,
) -> Path:
    """Convert a llama-family GGUF into an MLX model folder at ``out_dir`` and return its path.

    The folder is built beside ``out_dir`` under a temporary name and renamed when complete. An
    existing ``out_dir`` is replaced. ``dtype`` defaults to float32 on CPU, float16 on Metal.
    ``source`` is recorded in ``forgellm_import.json`` (default: the GGUF's path).
    """
    preload_blas()
    import mlx.core as mx

    def report(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    src = Path(gguf_path)
    dest = Path(out_dir)
    if not src.is_file():
        raise ModelImportError(f"{src} does not exist")
    report("reading", 0.0)
    weights, meta = _load_gguf(src)
    config = build_config(meta, weights)
    tokenizer, tok_config = build_tokenizer(meta)
    report("converting", 0.3)
    dtype = dtype or _default_dtype()
    converted = convert_weights(weights, config, dtype)
    config["torch_dtype"] = str(dtype).rsplit(".", 1)[-1]
    del weights

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.importing-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the model folder should look like any other
    try:
        report("writing", 0.6)
        mx.save_safetensors(str(tmp / "model.safetensors"), converted, metadata={"format": "mlx"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
        specials = {k: tok_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tok_config}
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        source = {
            "source": source or str(src.resolve()),
            "format": "gguf",
            "name": _scalar(meta, "general.name"),
            "license": _scalar(meta, "general.license"),
        }
        (tmp / "forgellm_import.json").write_text(json.dumps(source, indent=2))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report("done", 1.0)
    log.info(
        "gguf.imported",
        source=str(src),
        dest=str(dest),
        layers=config["num_hidden_layers"],
        dtype=config["torch_dtype"],
        platform=sys.platform,
    )
    return dest


__all__ = ["ModelImportError", "build_config", "build_tokenizer", "import_gguf", "read_tensor_types"]
