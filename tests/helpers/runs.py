"""Training runs through a platform's REST API, for the trainer's tests: a workspace with a tiny
model and datasets, start, status, wait, and the run's metrics."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from tests.helpers.procs import Platform, http, poll
from tests.helpers.tiny_lm import write_corpus, write_tiny_model

FAST = {"model_name": "tiny", "dataset": "grammar", "batch_size": 4, "learning_rate": 2e-3,
        "max_seq_length": 64, "warmup_steps": 5, "steps_per_report": 5, "seed": 1}


def write_training_workspace(home: Path, *, uneven_chats: bool = False) -> Path:
    """models/base/tiny and three datasets: ``grammar`` (learnable text), ``noise`` (random
    strings: memorising them can only hurt held-out text) and ``chat`` (IFT; ``uneven_chats``
    gives its prompts different lengths, so ranks' shares of a batch hold different token counts)."""
    write_tiny_model(home / "models" / "base" / "tiny")
    write_corpus(home / "dataset" / "grammar")
    rng = random.Random(5)
    noise = home / "dataset" / "noise"
    noise.mkdir(parents=True)
    for i in range(8):
        (noise / f"n{i}.txt").write_text(" ".join("".join(rng.choices(string.ascii_lowercase, k=6))
                                                  for _ in range(15)))
    chat = home / "dataset" / "chat"
    chat.mkdir()
    times = ("dawn", "noon", "dusk", "night", "low water", "high water") * 3
    (chat / "train.jsonl").write_text("".join(
        json.dumps({"messages": [
            {"role": "user", "content": f"Where does the heron go at {t}?" + (" now" * (i % 4) * uneven_chats)},
            {"role": "assistant", "content": f"The heron crosses the estuary at {t}."}]}) + "\n"
        for i, t in enumerate(times)))
    return home


def start(platform: Platform, **fields) -> dict:
    code, body, _ = http("POST", platform.web + "/api/training/start", {**FAST, **fields})
    assert code == 200, body
    return body


def status(platform: Platform) -> dict:
    return http("GET", platform.web + "/api/training/status")[1]


def wait_done(platform: Platform, timeout: float = 120) -> dict:
    return poll(lambda: status(platform), lambda s: not s["is_training"], timeout, "the run to finish", 0.2)


def metrics(platform: Platform, output_dir: str) -> list[dict]:
    return [json.loads(line) for line in (platform.home / output_dir / "metrics.jsonl").read_text().splitlines()]


def stop_if_running(platform: Platform) -> None:
    """After a test: a failed one must not leave its run going (the next start would get a 409)."""
    if status(platform).get("is_training"):
        http("POST", platform.web + "/api/training/stop")
        wait_done(platform, 120)
