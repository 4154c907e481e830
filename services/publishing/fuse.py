"""Fuse one chosen checkpoint into its base model and save a complete MLX model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def load_with_checkpoint(base_path: Path, adapter_config: dict[str, Any], checkpoint: Path) -> tuple[Any, Any, dict]:
    """The base model with exactly ``checkpoint``'s adapter weights applied (not fused)."""
    import mlx_lm
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer, config = mlx_lm.load(str(base_path), return_config=True)
    kind = adapter_config.get("fine_tune_type", "lora")
    if kind != "full":
        linear_to_lora_layers(model, adapter_config["num_layers"], adapter_config["lora_parameters"],
                              use_dora=kind == "dora")
    model.load_weights(str(checkpoint), strict=False)
    return model, tokenizer, config


def fuse_checkpoint(base_path: Path, adapter_config: dict[str, Any], checkpoint: Path, out_dir: Path) -> None:
    """Write base + ``checkpoint`` as plain weights into ``out_dir`` (which must not exist yet)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import save_config, save_model

    model, tokenizer, config = load_with_checkpoint(base_path, adapter_config, checkpoint)
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    out_dir.mkdir(parents=True)
    save_model(out_dir, model, donate_model=True)
    save_config(config, config_path=out_dir / "config.json")
    tokenizer.save_pretrained(str(out_dir))
    for name in ("generation_config.json", "chat_template.jinja"):
        if (base_path / name).is_file() and not (out_dir / name).exists():
            shutil.copy(base_path / name, out_dir / name)
    # keep where the weights came from next to them
    (out_dir / "fused_from.json").write_text(json.dumps(
        {"base_model_path": str(base_path), "checkpoint": str(checkpoint)}, indent=2))
