"""A tiny llama that trains in seconds: byte-level BPE tokenizer with a chat template, random
weights, saved as an MLX model folder that ``mlx_lm.load`` opens."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_sentences(n: int = 400) -> list[str]:
    """A learnable corpus: short sentences from a small grammar (seeded, so reproducible)."""
    import random

    rng = random.Random(0)
    subjects = ["the heron", "a gull", "the keeper", "the tide", "an otter", "the boat", "my sister", "the wind"]
    verbs = ["watches", "crosses", "follows", "finds", "circles", "measures", "greets", "passes"]
    objects = ["the estuary", "the old gauge", "a quiet pool", "the north pier", "the reed beds", "the lighthouse"]
    times = ["at dawn", "before the storm", "every spring", "at low water", "in the evening", "after rain"]
    return [f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(times)}."
            for _ in range(n)]


def write_tiny_model(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_sentences() + ["user assistant system What is the capital?"], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}))
    vocab = tokenizer.get_vocab_size()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "num_hidden_layers": layers, "intermediate_size": hidden * 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": True,
              "eos_token_id": tokenizer.token_to_id("<|im_end|>")}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_corpus(folder: Path, documents: int = 40, sentences: int = 10) -> Path:
    """A CPT dataset folder of ``documents`` text files drawn from the grammar."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = corpus_sentences(documents * sentences)
    for d in range(documents):
        (folder / f"doc{d:03d}.txt").write_text(" ".join(lines[d * sentences:(d + 1) * sentences]) + "\n")
    return folder
