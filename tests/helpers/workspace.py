"""Build workspaces on disk the way ForgeLLM lays them out (models, runs, datasets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def write_model(folder: Path, *, chat: bool = True, hidden: int = 16, vocab: int = 32, layers: int = 2,
                quantized_bits: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 4096}
    tensors = {"model.embed_tokens.weight": np.zeros((vocab, hidden), np.float16)}
    for i in range(layers):
        if quantized_bits:
            packed = hidden * quantized_bits // 32
            tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = np.zeros((hidden, packed), np.uint32)
            tensors[f"model.layers.{i}.self_attn.q_proj.scales"] = np.zeros((hidden, hidden // 8), np.float16)
            tensors[f"model.layers.{i}.self_attn.q_proj.biases"] = np.zeros((hidden, hidden // 8), np.float16)
        else:
            tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = np.zeros((hidden, hidden), np.float16)
    if quantized_bits:
        config["quantization"] = {"bits": quantized_bits, "group_size": 8}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = {"chat_template": CHAT_TEMPLATE} if chat else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def write_run(folder: Path, val_losses: dict[int, float], *, train_losses: list[float] | None = None,
              kind: str = "cpt") -> Path:
    """A finished run: config, metrics and one adapter file per checkpoint iteration."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_config.json").write_text(json.dumps(
        {"model_name": "base/tiny", "training_type": kind, "max_iterations": max(val_losses), "batch_size": 2}))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 4,
         "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.05,
                             "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}))
    lines = []
    for i, loss in enumerate(train_losses or [3.0, 2.5, 2.2, 2.0], 1):
        lines.append({"event": "train", "iteration": i * 10, "train_loss": loss, "learning_rate": 1e-4,
                      "tokens_per_second": 100.0 + i, "memory_usage_gb": 1.0 + i / 10, "peak_memory_gb": 1.5 + i / 10,
                      "timestamp": f"2025-01-15T10:3{i}:00Z"})
    for iteration, loss in val_losses.items():
        lines.append({"event": "eval", "iteration": iteration, "val_loss": loss, "timestamp": "2025-01-15T10:40:00Z"})
        lines.append({"event": "checkpoint", "iteration": iteration, "file": f"{iteration:07d}_adapters.safetensors",
                      "val_loss": loss})
        save_file({"lora_a": np.zeros((4, 4), np.float32)}, str(folder / f"{iteration:07d}_adapters.safetensors"))
    text = "\n".join(json.dumps(line) for line in lines) + "\n" + '{"event": "train", "iterat'  # a torn last line
    (folder / "metrics.jsonl").write_text(text)
    return folder
