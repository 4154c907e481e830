"""A real, tiny MLX model for tests, built in well under a second.

``build_tiny_model(folder)`` writes a random 2-layer llama (hidden 64, ~50k parameters) that
mlx-lm loads like any other: ``model.safetensors``, ``config.json``, a byte-level BPE
``tokenizer.json`` trained on a few sentences with the ``tokenizers`` library, and a
``tokenizer_config.json`` with a ChatML chat template (so its model type is "instruct"; pass
``chat=False`` for a base model). Weights come from a fixed seed: greedy output is reproducible.

``write_lora_run(run_dir, model_dir, {iteration: val_loss})`` writes a training run of LoRA
checkpoints that fit that model (random, non-zero ``lora_b``, a different seed per checkpoint),
with ``adapter_config.json``, ``training_config.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from forgellm.services.mlx_runtime import preload_blas

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Machine learning is a subset of artificial intelligence.",
    "Hello! How can I help you today? Tell me a story about a dragon.",
]
ARGS = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
LORA_KEYS = ["self_attn.q_proj", "self_attn.v_proj"]


def _tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer.get_vocab_size()


def build_tiny_model(folder: Path, *, chat: bool = True, seed: int = 0) -> Path:
    """Write the tiny llama to ``folder`` (e.g. ``<workspace>/models/base/tiny``); returns it."""
    preload_blas()
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(folder)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(model_type="llama", vocab_size=vocab, **ARGS))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    eos = SPECIALS.index("<|im_end|>")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "max_position_embeddings": 4096, "eos_token_id": eos, "torch_dtype": "float32", **ARGS}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 4096}
    if chat:
        tokenizer_config["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return folder


def write_lora_run(run_dir: Path, model_dir: Path, val_losses: dict[int, float], *, rank: int = 4,
                   scale: float = 20.0, kind: str = "ift") -> Path:
    """A finished LoRA run for the model at ``model_dir``: one checkpoint per iteration."""
    preload_blas()
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    run_dir.mkdir(parents=True, exist_ok=True)
    lora = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": LORA_KEYS}
    config = {"fine_tune_type": "lora", "num_layers": ARGS["num_hidden_layers"], "lora_parameters": lora}
    (run_dir / "adapter_config.json").write_text(json.dumps(config, indent=1))
    (run_dir / "training_config.json").write_text(json.dumps(
        {"model_name": model_dir.name, "training_type": kind, "max_iterations": max(val_losses)}))
    lines = []
    for n, (iteration, loss) in enumerate(sorted(val_losses.items())):
        model, _ = load_model(model_dir)
        linear_to_lora_layers(model, config["num_layers"], lora)
        mx.random.seed(1000 + n)
        params = {}
        for name, value in tree_flatten(model.parameters()):
            if name.endswith(".lora_b"):
                value = mx.random.normal(value.shape) * 0.5
            if name.endswith((".lora_a", ".lora_b")):
                params[name] = value
        file = run_dir / f"{iteration:07d}_adapters.safetensors"
        mx.save_safetensors(str(file), params)
        lines.append({"event": "eval", "iteration": iteration, "val_loss": loss})
        lines.append({"event": "checkpoint", "iteration": iteration, "file": file.name, "val_loss": loss})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir
