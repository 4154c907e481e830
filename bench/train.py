"""Training throughput: ForgeLLM's trainer against ``python -m mlx_lm lora``, and the cost of watching.

    .venv/bin/python bench/train.py                  # compare x2 + watch: 6 runs of 9 steps, ~10 min
    .venv/bin/python bench/train.py --quick          # 7 steps per run (~8 min)
    .venv/bin/python bench/train.py --only compare --repeats 1 --iters 10
    .venv/bin/python bench/train.py --only watch --subscribers 50
    .venv/bin/python bench/train.py --only profile   # where our step's time goes (in process)
    .venv/bin/python bench/train.py --distributed    # 1 process vs 2 ranks, the exchange cost
                                                     # (bench/distributed.py says how)

Model: SmolLM2-135M-Instruct, imported by ``fetch_demo`` (float32, 30 layers) into a temp
workspace. Data: the sample CPT dataset, split into train/valid by ForgeLLM's own
``split_documents`` (seed 0, 10 %). Both tools: LoRA rank 8, scale 2.0 (alpha 16), dropout 0,
the last 16 layers, every Linear of those layers, batch 2, max_seq_length 512, AdamW
(weight decay 0.01), compiled step, OpenBLAS.

compare  ours: the real worker, ``python -m forgellm.services.training.worker RUN_DIR``, with a
         ``training_config.json`` written by ``prepare_run`` (what the trainer service does),
         read from ``RUN_DIR/metrics.jsonl``. It packs the documents (EOS between them) into
         rows of 513 tokens: every position is a trained token.
         mlx-lm: ``python -m mlx_lm lora --train ...`` (run through ``runpy`` by a wrapper, this
         file's ``_mlx_lm`` command, which first loads the same OpenBLAS with
         ``services.mlx_runtime.preload_blas`` and adds a TrainingCallback that appends each
         report to a JSON Lines file; otherwise mlx-lm's own ``main()`` with these arguments).
         Its data are the same train/valid documents, each cut into pieces of at most 511
         tokens (mlx-lm truncates longer rows to max_seq_length and would drop the rest), so
         it trains on the same tokens; it pads each batch (sorted by length) to a multiple of
         32 + 1. Its ``tokens_per_second`` counts ``mask.sum()``: non-padding target positions
         only (see mlx_lm/tuner/trainer.py ``default_loss`` and ``train``), and excludes the
         time spent in validation.
         Tokens/s for both = the non-padding tokens of the measured report windows / their
         time. Windows: the first (R steps: compile warm-up) and the last (1 step, which for
         ours holds the final validation + checkpoint) are left out for both.
watch    the whole platform (``forgellm start``), runs started with ``POST /api/training/start``;
         the same run without and with N Socket.IO clients (python-socketio AsyncClient over
         aiohttp, websocket transport, ``subscribe_training``) in a separate process, in the
         order without, with (``--abba``: without, with, with, without); tokens/s from each
         run's metrics.jsonl, windows as above.
profile  in this process, our worker's own ``Run`` (model, data, compiled step) timed piece by
         piece, plus variants (not compiled, no compile of the optimizer, loss in one piece...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
SAMPLE = ROOT / "forgellm" / "sample_data" / "sample_cpt"
MODEL = "SmolLM2-135M-Instruct"

BATCH, RANK, ALPHA, LAYERS, SEQ, LR, SEED = 2, 8, 16.0, 16, 512, 1e-5, 0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- set-up ------------------------------------------------------------------------------------


def make_workspace(home: Path) -> Path:
    from forgellm.services.modelio.demo import fetch_demo

    model = fetch_demo(home)
    shutil.copytree(SAMPLE, home / "dataset" / "sample_cpt")
    return model


def mlx_lm_data(home: Path, model: Path, seq: int) -> tuple[Path, dict]:
    """train.jsonl / valid.jsonl of {"text": ...}: the same documents as our split, each cut into
    pieces of at most seq - 1 tokens (mlx-lm appends EOS and truncates rows to seq)."""
    from transformers import AutoTokenizer

    from forgellm.services.training.data import load_documents, split_documents

    tok = AutoTokenizer.from_pretrained(str(model))
    train_docs, valid_docs = split_documents(load_documents(home / "dataset" / "sample_cpt"), 0.1, SEED)
    out = home / "mlx_lm_data"
    out.mkdir(exist_ok=True)
    stats = {}
    for name, docs in (("train", train_docs), ("valid", valid_docs)):
        pieces = []
        for doc in docs:
            ids = tok.encode(doc)
            start = 0
            while start < len(ids):
                size = seq - 1
                while True:  # a decoded piece can re-encode longer: shrink until it fits
                    text = tok.decode(ids[start:start + size])
                    if len(tok.encode(text)) <= seq - 1 or size <= 16:
                        break
                    size -= 8
                pieces.append(text)
                start += size
        with open(out / f"{name}.jsonl", "w") as f:
            for text in pieces:
                f.write(json.dumps({"text": text}) + "\n")
        stats[name] = {"documents": len(docs), "rows": len(pieces),
                       "tokens": sum(len(tok.encode(d)) + 1 for d in pieces)}
    return out, stats


# --- ours: the real worker ---------------------------------------------------------------------


def write_run(home: Path, iters: int, report: int, **extra) -> Path:
    from forgellm.schemas import TrainingStartRequest
    from forgellm.services.common.workspace import Workspace
    from forgellm.services.training.runs import prepare_run

    request = TrainingStartRequest(**run_fields(iters, report, **extra))
    return prepare_run(Workspace(home), request).run_dir


def run_fields(iters: int, report: int, **extra) -> dict:
    return {"model_name": MODEL, "dataset": "sample_cpt", "training_type": "cpt", "max_iterations": iters,
            "batch_size": BATCH, "learning_rate": LR, "lora_rank": RANK, "lora_alpha": ALPHA,
            "lora_layers": LAYERS, "max_seq_length": SEQ, "steps_per_report": report,
            "steps_per_eval": 10**6, "save_every": 10**6, "val_batches": 1, "warmup_steps": 0,
            "early_stopping_patience": 0, "seed": SEED, **extra}


def ours_windows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows, prev_it, prev_tok = [], 0, 0
    for row in rows:
        if row["event"] != "train":
            continue
        tokens = row["trained_tokens"] - prev_tok
        windows.append({"first": prev_it + 1, "last": row["iteration"], "tokens": tokens,
                        "seconds": tokens / row["tokens_per_second"], "loss": row["train_loss"]})
        prev_it, prev_tok = row["iteration"], row["trained_tokens"]
    return windows


def run_ours(home: Path, iters: int, report: int) -> dict:
    run_dir = write_run(home, iters, report)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELLM_")}
    env.update({"FORGELLM_HOME": str(home), "FORGELLM_LOGGING_FORMAT": "json"})
    started = time.perf_counter()
    log_path = run_dir / "worker.log"
    with open(log_path, "w") as log_file:
        code = subprocess.run([sys.executable, "-m", "forgellm.services.training.worker", str(run_dir)], env=env,
                              cwd=home, stdout=log_file, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    log_text = log_path.read_text()
    if code != 0:
        raise SystemExit(f"worker failed ({code}):\n{log_text[-3000:]}")
    blas = None
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "blas":
            blas = record.get("library")
    return {"tool": "ours", "windows": ours_windows(run_dir), "wall_s": wall, "blas": blas}


# --- mlx-lm -------------------------------------------------------------------------------------


def mlx_lm_wrapper(argv: list[str]) -> None:
    """``_mlx_lm METRICS_FILE ARGS...`` = ``python -m mlx_lm ARGS...`` with OpenBLAS preloaded
    and every training report appended to METRICS_FILE."""
    sys.path.insert(0, str(ROOT))
    from forgellm.services.mlx_runtime import preload_blas

    blas = preload_blas()
    metrics_file, args = argv[0], argv[1:]
    import runpy

    import mlx_lm.lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Report(TrainingCallback):
        def __init__(self) -> None:
            self.file = open(metrics_file, "a")
            self.file.write(json.dumps({"event": "blas", "library": blas}) + "\n")

        def on_train_loss_report(self, info: dict) -> None:
            self.file.write(json.dumps({"event": "train", **info}) + "\n")
            self.file.flush()

    mlx_lm.lora.get_reporting_callbacks = lambda *a, **k: Report()
    sys.argv = ["mlx_lm", *args]
    runpy.run_module("mlx_lm", run_name="__main__", alter_sys=True)


def run_mlx_lm(home: Path, model: Path, data: Path, iters: int, report: int) -> dict:
    config = home / "mlx_lm_config.yaml"
    config.write_text(f"lora_parameters:\n  rank: {RANK}\n  scale: {ALPHA / RANK}\n  dropout: 0.0\n")
    metrics = home / f"mlx_lm_metrics_{time.time_ns()}.jsonl"
    adapters = home / "mlx_lm_adapters"
    argv = [sys.executable, str(HERE), "_mlx_lm", str(metrics), "lora", "--train", "--model", str(model),
            "--data", str(data), "--batch-size", str(BATCH), "--num-layers", str(LAYERS), "--iters", str(iters),
            "--max-seq-length", str(SEQ), "-c", str(config), "--fine-tune-type", "lora",
            "--optimizer", "adamw", "--learning-rate", str(LR), "--steps-per-report", str(report),
            "--steps-per-eval", str(10**6), "--val-batches", "1", "--save-every", str(10**6),
            "--adapter-path", str(adapters), "--seed", str(SEED)]
    env = {**os.environ, "FORGELLM_LOGGING_FORMAT": "json"}
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"mlx-lm failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    windows, prev_it, prev_tok = [], 0, 0
    for row in rows:
        if row["event"] != "train":
            continue
        tokens = row["trained_tokens"] - prev_tok
        windows.append({"first": prev_it + 1, "last": row["iteration"], "tokens": tokens,
                        "seconds": tokens / row["tokens_per_second"], "loss": row["train_loss"]})
        prev_it, prev_tok = row["iteration"], row["trained_tokens"]
    blas = next((r["library"] for r in rows if r["event"] == "blas"), None)
    printed = [line.strip() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    return {"tool": "mlx-lm", "windows": windows, "wall_s": wall, "blas": blas, "printed": printed[-3:]}


def summarize(result: dict, report: int, iters: int) -> dict:
    """Tokens/s over the windows after the first (warm-up) and before the last (final step)."""
    measured = [w for w in result["windows"] if w["first"] > report and w["last"] < iters]
    tokens = sum(w["tokens"] for w in measured)
    seconds = sum(w["seconds"] for w in measured)
    steps = sum(w["last"] - w["first"] + 1 for w in measured)
    return {**result, "measured_steps": steps, "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds else None,
            "seconds_per_step": seconds / steps if steps else None,
            "tokens_per_step": tokens / steps if steps else None}


def compare(home: Path, model: Path, measured: int, report: int, repeats: int) -> list[dict]:
    data, stats = mlx_lm_data(home, model, SEQ)
    say(f"mlx-lm data: {stats}")
    iters = report + measured + 1
    rounds = []
    for r in range(repeats):
        order = ("ours", "mlx-lm") if r % 2 == 0 else ("mlx-lm", "ours")
        got = {}
        for tool in order:
            say(f"[compare {r + 1}/{repeats}] {tool}: {iters} iterations")
            raw = run_ours(home, iters, report) if tool == "ours" else run_mlx_lm(home, model, data, iters, report)
            got[tool] = summarize(raw, report, iters)
            say(f"    {got[tool]['tokens_per_second']:.1f} tokens/s ({got[tool]['tokens_per_step']:.0f} tokens/step, "
                f"{got[tool]['seconds_per_step']:.2f} s/step, wall {raw['wall_s']:.0f} s, blas {raw['blas']})")
        ratio = got["ours"]["tokens_per_second"] / got["mlx-lm"]["tokens_per_second"]
        say(f"    ratio ours / mlx-lm = {ratio:.2f}")
        rounds.append({"order": order, "ours": got["ours"], "mlx_lm": got["mlx-lm"], "ratio": ratio,
                       "mlx_lm_data": stats})
    return rounds


# --- watch: the platform with and without Socket.IO subscribers --------------------------------


def subscribers_main(argv: list[str]) -> None:
    """``_subscribers URL N READY_FILE``: N Socket.IO clients subscribed to training updates until
    SIGTERM; then prints {"updates": total received} on stdout."""
    import socketio

    url, n, ready = argv[0], int(argv[1]), Path(argv[2])

    async def main() -> None:
        clients, counts = [], [0]
        for _ in range(n):
            client = socketio.AsyncClient(reconnection=False)
            client.on("training_update", lambda data: counts.__setitem__(0, counts[0] + 1))
            await client.connect(url, transports=["websocket"], wait_timeout=10)
            await client.call("subscribe_training", {}, timeout=10)
            clients.append(client)
        ready.touch()  # noqa: ASYNC240 (one tiny write, before anything waits on this loop)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        print(json.dumps({"updates": counts[0]}), flush=True)
        for client in clients:
            await client.disconnect()

    asyncio.run(main())


class RunFailed(RuntimeError):
    pass


def platform_run(platform_, iters: int, report: int) -> dict:
    from tests.helpers.procs import http

    status, body, _ = http("POST", platform_.web + "/api/training/start", run_fields(iters, report))
    if status != 200:
        raise SystemExit(f"start failed: {status} {body}")
    started = time.perf_counter()
    while True:
        time.sleep(0.5)
        current = http("GET", platform_.web + "/api/training/status")[1]
        if not current["is_training"] and current["phase"] not in ("starting",):
            break
        if time.perf_counter() - started > 900:
            raise SystemExit("run did not finish")
    if current["phase"] != "completed":
        events = (platform_.home / body["output_dir"] / "metrics.jsonl").read_text().splitlines()
        raise RunFailed(f"run ended {current['phase']}; last metrics: {events[-2:]}")
    return {"tool": "platform", "windows": ours_windows(platform_.home / body["output_dir"]),
            "wall_s": time.perf_counter() - started, "blas": None}


def watch(home: Path, measured: int, report: int, subscribers: int, order: tuple[str, ...]) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.helpers.procs import Platform

    iters = report + measured + 1
    running = Platform(home).start()
    runs = []
    try:
        running.wait_healthy(timeout=60)
        for label in order:
            helper, received = None, None
            if label == "with":
                ready = home / f"subs_ready_{len(runs)}"
                helper = subprocess.Popen([sys.executable, str(HERE), "_subscribers", running.web, str(subscribers),
                                           str(ready)], stdout=subprocess.PIPE, text=True)
                deadline = time.monotonic() + 60
                while not ready.exists():
                    if helper.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("subscribers did not connect")
                    time.sleep(0.1)
            say(f"[watch] {label} {subscribers if helper else 0} subscribers: {iters} iterations")
            try:
                try:
                    result = summarize(platform_run(running, iters, report), report, iters)
                except RunFailed as exc:  # e.g. a test elsewhere on this shared machine kill -9'd "a worker"
                    say(f"    run failed ({exc}); once more")
                    result = summarize(platform_run(running, iters, report), report, iters)
            finally:
                if helper:
                    helper.send_signal(signal.SIGTERM)
                    out, _ = helper.communicate(timeout=30)
                    received = json.loads(out.strip().splitlines()[-1])["updates"] if out.strip() else None
            result.update(label=label, subscribers=subscribers if helper else 0, updates_received=received)
            say(f"    {result['tokens_per_second']:.1f} tokens/s; updates received by the clients: {received}")
            runs.append(result)
    finally:
        running.stop()
        running.kill_everything()

    def mean(label: str) -> float:
        values = [r["tokens_per_second"] for r in runs if r["label"] == label]
        return sum(values) / len(values)

    ratio = mean("with") / mean("without")
    say(f"[watch] with / without = {ratio:.3f}")
    return {"runs": runs, "ratio": ratio, "without": mean("without"), "with": mean("with")}


# --- profile: our step, in process ---------------------------------------------------------------


def profile(home: Path, steps: int) -> dict:
    """Time our worker's own compiled step and its parts, plus variants, in this process."""
    from forgellm.services.mlx_runtime import preload_blas

    blas = preload_blas()
    import mlx.core as mx
    import mlx.nn as nn

    from forgellm.services.training.data import make_batch
    from forgellm.services.training.worker import Run

    class NoEvents:
        def publish(self, *_a, **_k) -> None:
            pass

    run = Run(write_run(home, 1000, 10), NoEvents())
    run.load_model()
    run.prepare_data()
    run.build_step()
    batches = []
    for it in range(1, steps + 3):
        inputs, targets, mask = make_batch(run.train, run.order.indices(it), run.pad_id)
        batches.append((mx.array(inputs), mx.array(targets), mx.array(mask)))

    def timed(name: str, fn) -> float:
        fn(batches[0])
        fn(batches[1])  # compile / warm-up
        t = time.perf_counter()
        for b in batches[2:]:
            fn(b)
        per = (time.perf_counter() - t) / (len(batches) - 2)
        say(f"  {name:<58} {per * 1000:8.0f} ms/step  {BATCH * SEQ / per:6.1f} tokens/s")
        return per

    model, loss_fn = run.model, run.loss_fn
    out = {"blas": blas}

    def full(b):
        loss, _ = run.step(*b)
        mx.eval(loss, run.model.state, run.optimizer.state)

    out["worker step (compiled: value_and_grad + AdamW)"] = timed("worker step (compiled)", full)

    def forward(b):
        mx.eval(loss_fn(model, *b)[0])

    out["forward + loss only"] = timed("forward + loss only (not compiled)", forward)
    cforward = mx.compile(lambda i, t, m: loss_fn(model, i, t, m)[0], inputs=[model.state])

    def forward_c(b):
        mx.eval(cforward(*b))

    out["forward + loss, compiled"] = timed("forward + loss only (compiled)", forward_c)
    vg = nn.value_and_grad(model, loss_fn)

    def grads(b):
        (loss, _), g = vg(model, *b)
        mx.eval(loss, g)

    out["value_and_grad, not compiled"] = timed("value_and_grad, not compiled", grads)

    def uncompiled(b):
        (loss, _), g = vg(model, *b)
        run.optimizer.update(model, g)
        mx.eval(loss, model.state, run.optimizer.state)

    out["step, not compiled"] = timed("value_and_grad + AdamW, not compiled", uncompiled)

    def backbone(b):  # the model without the LM head: how much the 49k-vocab head costs
        h = model.model(b[0])
        mx.eval(h)

    out["forward of the backbone only (no LM head)"] = timed("forward, backbone only (no LM head, no loss)",
                                                              backbone)
    return {k: (v * 1000 if isinstance(v, float) else v) for k, v in out.items()}


# --- main --------------------------------------------------------------------------------------


def machine() -> str:
    cpus = os.cpu_count()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import importlib.metadata as md

    return (f"{cpus} cores {platform.machine()} ({model}), Linux {platform.release()}, Python "
            f"{platform.python_version()}, mlx {md.version('mlx')}, mlx-lm {md.version('mlx-lm')}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_mlx_lm":
        return mlx_lm_wrapper(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_subscribers":
        return subscribers_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer measured iterations")
    parser.add_argument("--iters", type=int, help="measured iterations per run (after the warm-up window)")
    parser.add_argument("--report", type=int, default=2, help="steps per report window (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="compare runs (the order alternates)")
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--abba", action="store_true",
                        help="watch: without, with, with, without (default: without, with)")
    parser.add_argument("--only", choices=("compare", "watch", "profile"), action="append")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--distributed", action="store_true",
                        help="1 process vs 2 ranks on the same work, LoRA and full (bench/distributed.py)")
    args = parser.parse_args()
    measured = args.iters or (4 if args.quick else 6)
    only = set(args.only or (("distributed",) if args.distributed else ("compare", "watch")))
    sys.path.insert(0, str(ROOT))
    say(machine())
    results: dict = {"machine": machine(), "date": date.today().isoformat(), "measured_iterations": measured,
                     "report": args.report, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory(prefix="fl-train-bench-") as name:
        home = Path(name)
        model = make_workspace(home)
        started = time.perf_counter()
        if "compare" in only:
            results["compare"] = compare(home, model, measured, args.report, args.repeats)
        if "watch" in only:
            results["watch"] = watch(home, measured, args.report, args.subscribers,
                                     ("without", "with", "with", "without") if args.abba else ("without", "with"))
        if "profile" in only:
            results["profile"] = profile(home, measured)
        if "distributed" in only:
            import distributed

            results["distributed"] = distributed.run(home, model, args.iters or (2 if args.quick else 4),
                                                     args.report, args.repeats)
        results["wall_s"] = time.perf_counter() - started
        say(f"total {results['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "compare"} | {"compare_ratios": [
        r["ratio"] for r in results.get("compare", [])]}, default=str))


if __name__ == "__main__":
    main()
