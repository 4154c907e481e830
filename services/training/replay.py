"""Self-synthesized rehearsal: general text the base model writes itself.

When ``data_mixture_ratio`` r < 1 and no ``general_dataset`` is named, 1 − r of the training
rows come from text the *base* model generates from neutral prompts (before any training step:
LoRA's B matrices start at zero, so the wrapped model is still exactly the base model).
Rehearsing its own distribution protects what the model already knows without any canned text.
The text is cached per base model (``.forgellm/replay/<model>.jsonl``) and grows on demand; at
most ``MAX_TOKENS`` tokens are generated (CPU generation is slow), and the rows are reused
cyclically when the mixture asks for more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_TOKENS = 4096
TOKENS_PER_SAMPLE = 192
NEUTRAL_PROMPTS = (
    "Write a short paragraph about something you find interesting.",
    "Explain an everyday scientific idea in simple words.",
    "Describe a place you would like to visit and why.",
    "Tell a short story about a small act of kindness.",
    "Give some practical advice for learning a new skill.",
    "Summarize how a common household object works.",
    "Write a few sentences about the history of a famous invention.",
    "Describe the changing of the seasons.",
    "Explain why sleep is important.",
    "Write a brief letter to a friend about your week.",
    "Describe how to cook a simple meal.",
    "Explain a basic idea from mathematics with an example.",
)


def cache_file(cache_dir: Path, model_path: Path) -> Path:
    weights = sorted(model_path.glob("*.safetensors"))
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in weights)
    digest = hashlib.sha1(f"{model_path.resolve()}|{stamp}".encode()).hexdigest()[:16]
    return cache_dir / f"{model_path.name}-{digest}.jsonl"


def replay_texts(model: Any, tokenizer: Any, model_path: Path, cache_dir: Path, tokens_wanted: int, seed: int,
                 on_progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Cached replay text, generated until it holds min(tokens_wanted, MAX_TOKENS) tokens."""
    import mlx.core as mx
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    path = cache_file(cache_dir, model_path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                texts.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
    target = min(tokens_wanted, MAX_TOKENS)
    have = sum(len(tokenizer.encode(t)) for t in texts)
    sampler = make_sampler(temp=0.8, top_p=0.95)
    with open(path, "a") as out:
        while have < target:
            index = len(texts)
            prompt = NEUTRAL_PROMPTS[index % len(NEUTRAL_PROMPTS)]
            if getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, tokenize=False)
            mx.random.seed(seed * 1009 + index)
            text = generate(model, tokenizer, prompt, max_tokens=TOKENS_PER_SAMPLE, sampler=sampler).strip()
            if not text:
                text = " "
            texts.append(text)
            out.write(json.dumps({"text": text, "prompt_index": index}) + "\n")
            out.flush()
            have += len(tokenizer.encode(text))
            if on_progress:
                on_progress(have, target)
    log.info("replay_ready", texts=len(texts), tokens=have, cache=str(path))
    return texts
