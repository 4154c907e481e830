"""Catalog latency with a big workspace: GET /api/models and GET /api/checkpoints with
200 runs x 10 checkpoints on disk (target: p50 <= 50 ms on a 2-core machine).

    .venv/bin/python bench/catalog.py [--runs 200] [--checkpoints 10] [--requests 200]

Baseline side by side: GET /api/health through the same gateway (no disk work, no bus hop),
so the table shows what the catalog's disk scan costs on top of the HTTP round trip.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.procs import Platform  # noqa: E402
from tests.helpers.workspace import write_model, write_run  # noqa: E402


def build(home: Path, runs: int, checkpoints: int) -> None:
    write_model(home / "models" / "base" / "tiny")
    for i in range(runs):
        kind = "cpt" if i % 2 == 0 else "ift"
        losses = {(c + 1) * 10: 3.0 - 0.01 * c + 0.001 * (i % 7) for c in range(checkpoints)}
        write_run(home / "models" / kind / f"tiny_lr1e_04_bs2_iter{checkpoints * 10}_run{i:03d}", losses, kind=kind)
    for i in range(20):
        write_model(home / "models" / "published" / f"tiny_run{i:03d}_0000010_20250115_1045{i:02d}")


def measure(url: str, count: int) -> dict[str, float]:
    for _ in range(5):
        urllib.request.urlopen(url).read()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(url) as response:
            body = response.read()
        samples.append((time.perf_counter() - started) * 1000)
    json.loads(body)
    samples.sort()
    return {"p50": statistics.median(samples), "p99": samples[int(len(samples) * 0.99) - 1],
            "bytes": len(body)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as name:
        home = Path(name) / "ws"
        started = time.perf_counter()
        build(home, args.runs, args.checkpoints)
        print(f"workspace: {args.runs} runs x {args.checkpoints} checkpoints, 20 published "
              f"(built in {time.perf_counter() - started:.1f} s)")
        platform = Platform(home).start()
        try:
            platform.wait_healthy()
            run = sorted((home / "models" / "cpt").iterdir())[0].relative_to(home)
            cases = [
                ("GET /api/health (baseline)", platform.web + "/api/health"),
                ("GET /api/models", platform.web + "/api/models"),
                ("GET /api/checkpoints?training_dir=…", f"{platform.web}/api/checkpoints?training_dir={run}"),
                ("GET /api/checkpoints (current run)", platform.web + "/api/checkpoints"),
            ]
            print(f"{'request':40} {'p50 ms':>8} {'p99 ms':>8} {'body KB':>8}")
            for label, url in cases:
                result = measure(url, args.requests)
                print(f"{label:40} {result['p50']:8.2f} {result['p99']:8.2f} {result['bytes'] / 1024:8.1f}")
        finally:
            platform.stop()
            platform.kill_everything()


if __name__ == "__main__":
    main()
