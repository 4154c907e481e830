"""The model card (``README.md``, Hugging Face style) and ``publish.json`` of a published model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from forgellm.services.common.models import read_json

# Fields of training_config.json that are bookkeeping, not training settings.
BOOKKEEPING = {"training_id", "model_path", "dataset_path", "general_dataset_path", "output_dir", "created_at",
               "resume_from", "workspace"}


def base_license(base_path: Path) -> str:
    """The base model's licence: its card's front matter, else what the importer recorded."""
    readme = base_path / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and front.get("license"):
                return str(front["license"])
    imported = read_json(base_path / "forgellm_import.json")
    for key in ("license", "licence"):
        if imported.get(key):
            return str(imported[key]).lower()
    return "other"


def reproduce_command(config: dict[str, Any]) -> str:
    parts = ["forgellm train", f"--model {config['model_name']}", f"--dataset {config['dataset']}"]
    for key, value in config.items():
        if key in BOOKKEEPING or key in ("model_name", "dataset") or value is None or value == []:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " \\\n  ".join(parts)


def facts(config: dict[str, Any], iteration: int, val_loss: float | None, rank: int | None, n_checkpoints: int,
          license_id: str, name: str) -> dict[str, Any]:
    return {
        "model_name": f"published/{name}",
        "base_model": config["model_name"],
        "license": license_id,
        "training_id": config.get("training_id"),
        "training_type": config.get("training_type"),
        "dataset": config.get("dataset"),
        "checkpoint_iteration": iteration,
        "validation_loss": val_loss,
        "perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "rank": rank,
        "checkpoints_in_run": n_checkpoints,
        "training_config": {k: v for k, v in config.items() if k not in BOOKKEEPING},
        "reproduce": reproduce_command(config),
    }


def model_card(f: dict[str, Any]) -> str:
    front = {
        "base_model": f["base_model"],
        "library_name": "mlx",
        "license": f["license"],
        "tags": ["mlx", "forgellm", f["training_type"] or "fine-tuned",
                 "lora" if f["training_config"].get("fine_tune_type") != "full" else "full-fine-tune"],
        "pipeline_tag": "text-generation",
        "forgellm": {
            "training_id": f["training_id"],
            "checkpoint": f.get("checkpoint_path"),
            "checkpoint_iteration": f["checkpoint_iteration"],
            "validation_loss": f["validation_loss"],
        },
    }
    kind = {"cpt": "continued pre-training", "ift": "instruction tuning"}.get(f["training_type"], "fine-tuning")
    val = f"{f['validation_loss']:.4f}" if f["validation_loss"] is not None else "not measured"
    ppl = f"{f['perplexity']:.2f}" if f["perplexity"] is not None else "n/a"
    rank = f"{f['rank']} of {f['checkpoints_in_run']}" if f["rank"] else f"unranked (of {f['checkpoints_in_run']})"
    config_yaml = yaml.safe_dump(f["training_config"], sort_keys=True).rstrip()
    return f"""---
{yaml.safe_dump(front, sort_keys=False).rstrip()}
---

# {f['model_name']}

`{f['base_model']}` after {kind} on the dataset `{f['dataset']}` with ForgeLLM, published from the
checkpoint at iteration **{f['checkpoint_iteration']}** of run `{f['training_id']}` (the adapter of that
checkpoint fused into the base weights).

## This checkpoint

| | |
|---|---|
| iteration | {f['checkpoint_iteration']} |
| validation loss | {val} |
| perplexity (exp of validation loss) | {ppl} |
| rank among the run's checkpoints (1 = lowest validation loss) | {rank} |

![training dashboard](training_dashboard.png)

## Use it

```python
from mlx_lm import load, generate

model, tokenizer = load("models/{f['model_name']}")
print(generate(model, tokenizer, prompt="Hello", max_tokens=100))
```

Or with ForgeLLM: `forgellm cli generate --model {f['model_name']}`.

## Training configuration

```yaml
{config_yaml}
```

## Reproduce the run

```bash
{f['reproduce']}
```
"""


def write_card(out_dir: Path, f: dict[str, Any]) -> tuple[Path, Path]:
    readme = out_dir / "README.md"
    readme.write_text(model_card(f))
    meta = out_dir / "publish.json"
    meta.write_text(json.dumps(f, indent=2))
    return readme, meta
