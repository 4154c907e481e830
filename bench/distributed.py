"""Distributed training: 1 process against 2 ranks on the same work, and what the gradient
exchange costs. Run through ``bench/train.py --distributed`` (or this file directly).

    .venv/bin/python bench/train.py --distributed              # LoRA and full, 2 rounds, ~15 min
    .venv/bin/python bench/train.py --distributed --repeats 1 --iters 3

throughput  the real worker on SmolLM2-135M-Instruct (float32), global batch 4, rows of 257
            tokens: one process (``python -m forgellm.services.training.worker``) and two local
            ranks (``mlx.launch --backend ring -n 2`` through services/training/launcher.py, the
            command the trainer service runs, from ``cluster.launcher_argv``); for LoRA also two
            ranks through the plain ``mlx.launch`` executable; the order rotating per round. Tokens/s from rank 0's
            metrics.jsonl (every rank's tokens), windows as in bench/train.py: the first (compile
            warm-up) and the last (final validation and checkpoint) left out.
exchange    inside two ranks under mlx.launch, the model with its trainable parameters as the
            run has them (LoRA rank 8 on the last 16 layers, or every weight), gradients-shaped
            arrays averaged with ``mlx.nn.average_gradients`` on the CPU stream, as the training
            step does: seconds per exchange (median of N), bytes exchanged.
projection  a step on N hosts = (the 1-process step) / N + the exchange on N hosts; a ring
            all-reduce moves 2 (N-1)/N of the gradient bytes per rank, at the link's bandwidth,
            plus the per-call cost measured here. Link figures are assumptions, said as such.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

BATCH, SEQ = 4, 256
# Sustained TCP throughput one may expect per link (assumptions, not measurements here).
LINKS_GB_S = {"Thunderbolt 5 bridge": 5.0, "Thunderbolt 4 bridge": 2.5, "10 GbE": 1.1, "1 GbE": 0.11}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}"


def env_for(home: Path) -> dict[str, str]:
    from forgellm.services.training.losses import worker_environment

    env = {k: v for k, v in worker_environment().items() if not k.startswith("FORGELLM_")}
    env.update({"FORGELLM_HOME": str(home), "FORGELLM_LOGGING_FORMAT": "json"})
    return env


def run_once(home: Path, iters: int, report: int, fine_tune: str, ranks: int, launcher: str = "") -> dict:
    import msgspec
    import train as base

    from forgellm.config import load_settings
    from forgellm.schemas import TrainingStartRequest
    from forgellm.services.common.workspace import Workspace
    from forgellm.services.training.cluster import launcher_argv
    from forgellm.services.training.runs import prepare_run

    fields = base.run_fields(iters, report, batch_size=BATCH, max_seq_length=SEQ, fine_tune_type=fine_tune,
                             learning_rate=1e-5 if fine_tune == "lora" else 2e-6)
    if ranks > 1:
        fields["distributed"] = {"processes": ranks, "backend": "ring"}
    env = env_for(home)
    if launcher:  # e.g. the plain mlx.launch executable, busy loop and all
        env["FORGELLM_TRAINING_LAUNCHER"] = launcher
    settings = load_settings(env=env)
    prepared = prepare_run(Workspace(home), msgspec.convert(fields, TrainingStartRequest), settings=settings)
    argv = ([sys.executable, "-m", "forgellm.services.training.worker", str(prepared.run_dir)] if ranks == 1 else
            launcher_argv(prepared.layout, prepared.run_dir, None, "bench", env))
    before = load()
    started = time.perf_counter()
    with open(prepared.run_dir / "worker.log", "w") as log_file:
        subprocess.run(argv, env=env, cwd=home, stdout=log_file, stderr=subprocess.STDOUT,
                       stdin=subprocess.PIPE if ranks > 1 else subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - started
    events = (prepared.run_dir / "metrics.jsonl").read_text()
    if '"event": "complete"' not in events:
        raise SystemExit(f"run failed:\n{(prepared.run_dir / 'worker.log').read_text()[-3000:]}")
    summary = base.summarize({"tool": f"{ranks} rank(s)", "windows": base.ours_windows(prepared.run_dir),
                              "wall_s": wall}, report, iters)
    summary.update({"load_before": before, "load_after": load(), "ranks": ranks, "fine_tune_type": fine_tune,
                    "launcher": launcher or "ours"})
    return summary


def plain_mlx_launch() -> str:
    return str(Path(sys.executable).parent / "mlx.launch")


def throughput(home: Path, fine_tune: str, measured: int, report: int, repeats: int, plain: bool) -> list[dict]:
    """Rounds of: 1 process, 2 ranks (through our launcher), and with ``plain`` 2 ranks through
    the unpatched mlx.launch; the order rotates per round."""
    iters = report + measured + 1
    kinds = ["one", "two"] + (["two_plain"] if plain else [])
    rounds = []
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        got = {}
        for kind in order:
            ranks, launcher = (1, "") if kind == "one" else (2, plain_mlx_launch() if kind == "two_plain" else "")
            say(f"[{fine_tune} {r + 1}/{repeats}] {kind}: {iters} iterations ({load()})")
            got[kind] = run_once(home, iters, report, fine_tune, ranks, launcher)
            say(f"    {got[kind]['tokens_per_second']:.1f} tokens/s, {got[kind]['seconds_per_step']:.2f} s/step")
        losses = [(a["loss"], b["loss"]) for a, b in zip(got["one"]["windows"], got["two"]["windows"], strict=True)]
        ratio = got["two"]["tokens_per_second"] / got["one"]["tokens_per_second"]
        rounds.append({"order": order, **got, "ratio": ratio,
                       "max_loss_rel_diff": max(abs(a - b) / abs(a) for a, b in losses)})
        if plain:
            rounds[-1]["ratio_plain"] = got["two_plain"]["tokens_per_second"] / got["one"]["tokens_per_second"]
        say(f"    2 ranks / 1 process = {rounds[-1]['ratio']:.2f}"
            + (f" (plain mlx.launch {rounds[-1]['ratio_plain']:.2f})" if plain else "")
            + f"; losses agree to {rounds[-1]['max_loss_rel_diff']:.1e} (relative)")
    return rounds


# --- the exchange, inside two ranks -----------------------------------------------------------


def exchange_main(argv: list[str]) -> None:
    """``_exchange MODEL_PATH lora|full REPEATS OUT``: run under mlx.launch."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model_path, fine_tune, repeats, out = argv[0], argv[1], int(argv[2]), Path(argv[3])
    group = mx.distributed.init(strict=True, backend="ring")
    model, _ = mlx_lm.load(model_path)
    model.freeze()
    if fine_tune == "full":
        model.unfreeze()
    else:
        linear_to_lora_layers(model, 16, {"rank": 8, "scale": 2.0, "dropout": 0.0})
    grads = tree_map(lambda p: mx.ones_like(p) * (group.rank() + 1), model.trainable_parameters())
    mx.eval(grads)
    size = sum(v.nbytes for _, v in tree_flatten(grads))
    times = []
    for i in range(repeats + 2):
        started = time.perf_counter()
        averaged = nn.average_gradients(grads, group=group, communication_stream=mx.cpu)
        mx.eval(averaged)
        if i >= 2:  # the first two: warm-up (buffers, connections)
            times.append(time.perf_counter() - started)
    check = tree_flatten(averaged)[0][1].reshape(-1)[0].item()
    if group.rank() == 0:
        out.write_text(json.dumps({"fine_tune_type": fine_tune, "bytes": size, "seconds": times,
                                   "median_s": statistics.median(times), "check": check,
                                   "tensors": len(tree_flatten(grads))}))


def exchange(model: Path, fine_tune: str, repeats: int) -> dict:
    from forgellm.services.training.cluster import find_launcher, free_port_run

    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fl-exchange-{os.getpid()}-{fine_tune}.json"
    argv = [*find_launcher("mlx.launch"), "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
            "--starting-port", str(free_port_run(2)), "--python", sys.executable, "--", str(HERE), "_exchange",
            str(model), fine_tune, str(repeats), str(out)]
    done = subprocess.run(argv, stdin=subprocess.PIPE, capture_output=True, text=True, timeout=900, check=False)
    if not out.is_file():
        raise SystemExit(f"exchange failed:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    assert result["check"] == 1.5, result  # (1 + 2) / 2: the average of both ranks' arrays
    say(f"[exchange {fine_tune}] {result['bytes'] / 1e6:.1f} MB in {result['tensors']} tensors: "
        f"{result['median_s'] * 1000:.1f} ms median")
    return result


def project(step_one_s: float, exchange_bytes: int, fixed_s: float) -> dict:
    """Speedup on N hosts like this machine, per link: T1 / (T1 / N + all-reduce(N))."""
    table = {}
    for link, gb_s in LINKS_GB_S.items():
        row = {}
        for n in (2, 4, 8):
            moved = 2 * (n - 1) / n * exchange_bytes
            allreduce = moved / (gb_s * 1e9) + fixed_s * (n - 1)
            row[n] = round(step_one_s / (step_one_s / n + allreduce), 2)
        table[link] = row
    return table


def run(home: Path, model: Path, measured: int, report: int, repeats: int) -> dict:
    exchanges = {ft: exchange(model, ft, 20 if ft == "lora" else 5) for ft in ("lora", "full")}
    # The per-call cost beyond bandwidth: the LoRA exchange over loopback (a few small buckets).
    fixed = exchanges["lora"]["median_s"]
    results = {}
    for fine_tune in ("lora", "full"):
        rounds = throughput(home, fine_tune, measured, report, repeats, plain=fine_tune == "lora")
        moved = exchanges[fine_tune]
        step_two = statistics.median(r["two"]["seconds_per_step"] for r in rounds)
        step_one = statistics.median(r["one"]["seconds_per_step"] for r in rounds)
        results[fine_tune] = {
            "rounds": rounds, "exchange": moved, "step_one_s": step_one, "step_two_s": step_two,
            "exchange_share_of_step": moved["median_s"] / step_two,
            "projection_speedup": project(step_one, moved["bytes"], fixed),
        }
        say(f"[{fine_tune}] exchange {moved['median_s'] * 1000:.1f} ms = "
            f"{100 * results[fine_tune]['exchange_share_of_step']:.2f} % of a 2-rank step ({step_two:.2f} s); "
            f"projection {results[fine_tune]['projection_speedup']}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_exchange":
        exchange_main(sys.argv[2:])
