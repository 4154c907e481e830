"""The OpenAI-compatible API (gateway/openai_api.py) on a running platform with the tiny model,
driven by the official ``openai`` client: models, chat and completions, plain and streamed (SSE),
errors in OpenAI's shape, cancel on disconnect, the API token."""

from __future__ import annotations

import http.client as httpclient
import json
import tempfile
import time
from pathlib import Path

import openai
import pytest

from tests.helpers.procs import Platform, http, running_platform
from tests.helpers.tiny_model import build_tiny_model

GREEDY = {"temperature": 0.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def served():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        build_tiny_model(home / "models" / "base" / "tiny")
        build_tiny_model(home / "models" / "base" / "other", seed=1)
        with running_platform(home) as running:
            load(running, "tiny")
            yield running


def load(platform: Platform, model: str) -> dict:
    code, reply, _ = http("POST", platform.server + "/api/model/load", {"model_name": model})
    assert code == 200, reply
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = http("GET", platform.server + "/api/model/status")[1]
        if not status["is_loading"]:
            assert status["loaded"], status
            return status
        time.sleep(0.05)
    raise AssertionError("still loading")


@pytest.fixture
def client(served) -> openai.OpenAI:
    with openai.OpenAI(base_url=served.server + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def rest_generate(platform: Platform, **body) -> dict:
    code, reply, _ = http("POST", platform.server + "/api/model/generate", body, timeout=60)
    assert code == 200, reply
    return reply


def sse(platform: Platform, path: str, body: dict) -> tuple[str, list[str]]:
    """The raw event stream: (Content-Type, the data of each event)."""
    conn = httpclient.HTTPConnection("127.0.0.1", platform.server_port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return response.getheader("Content-Type"), [event[len("data: "):] for event in events]


def test_models_lists_the_loaded_model_first_then_the_catalog(client):
    models = client.models.list().data
    assert models[0].id == "tiny" and models[0].model_extra["loaded"] is True
    assert models[0].object == "model" and models[0].owned_by == "forgellm"
    assert "other" in {m.id for m in models[1:]}  # the catalog's models, not loaded
    assert [m.id for m in models].count("tiny") == 1


def test_chat_completion_matches_the_rest_api(served, client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hello! How can I help you today?"},
                {"role": "user", "content": "Tell me a story about a dragon"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, **GREEDY)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "tiny"
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    rest = rest_generate(served, prompt=messages[-1]["content"], history=messages[:-1], max_tokens=20, **GREEDY)
    assert choice.message.content == rest["response"]
    assert reply.usage.prompt_tokens == rest["prompt_tokens"]  # history went through the chat template
    assert reply.usage.completion_tokens == rest["tokens_generated"]
    assert reply.usage.total_tokens == rest["prompt_tokens"] + rest["tokens_generated"]
    assert choice.finish_reason == rest["finish_reason"]
    assert reply.model_extra["x_forgellm"]["time_to_first_token"] > 0
    # content given as text parts, "developer" as the system role: the same prompt
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You are terse."}]}, *messages[1:]]
    again = client.chat.completions.create(model="tiny", messages=parts, max_tokens=20, **GREEDY)
    assert again.choices[0].message.content == choice.message.content


def test_chat_stream_sends_the_same_answer_in_order(client):
    messages = [{"role": "user", "content": "Tell me a story about a dragon"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, **GREEDY)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "".join(pieces) == plain.choices[0].message.content
    with_reason = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(with_reason) == 1 and with_reason[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_sse_framing(served):
    content_type, events = sse(served, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True,
        **GREEDY})
    assert content_type == "text/event-stream"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


def test_completions_are_raw_text_plain_and_streamed(served, client):
    reply = client.completions.create(model="tiny", prompt="Paris is the capital of", max_tokens=12, **GREEDY)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    rest = rest_generate(served, prompt="Paris is the capital of", max_tokens=12, is_base_model=True, **GREEDY)
    assert reply.choices[0].text == rest["response"] and reply.usage.prompt_tokens == rest["prompt_tokens"]
    chunks = list(client.completions.create(model="tiny", prompt=["Paris is the capital of"], max_tokens=12,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    echoed = client.completions.create(model="tiny", prompt="Paris is", max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text.startswith("Paris is")


def test_sampling_parameters_reach_the_engine(client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, **GREEDY)
    text = full.choices[0].message.content
    assert len(text) > 12
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, stop=text[8:12], **GREEDY)
    assert cut.choices[0].message.content == text[: text.index(text[8:12])]
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=3, **GREEDY)
    assert short.usage.completion_tokens <= 3
    seeded = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=1.0,
                                             seed=11).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    penalized = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40,
                                               frequency_penalty=2.0, **GREEDY)
    assert penalized.choices[0].message.content != text  # OpenAI's additive penalty, applied exactly


def test_unknown_model_is_a_404_in_openai_shape(served, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert "gpt-4o" in error["message"] and "tiny" in error["message"] and error["type"] == "invalid_request_error"
    code, body, _ = http("POST", served.server + "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert code == 404 and set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    # the catalog knows "other", but it is not the loaded model
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        client.completions.create(model="other", prompt="hi")


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_requests_are_400_naming_the_parameter(served, body, param):
    full = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    code, reply, _ = http("POST", served.server + "/v1/chat/completions", full)
    assert code == 400, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param, reply


def test_alias_and_both_ports(served):
    load(served, "models/base/tiny")  # a workspace path: its alias is the folder's name
    try:
        for base in (served.server, served.web):
            for model in ("tiny", "models/base/tiny"):
                code, reply, _ = http("POST", base + "/v1/completions",
                                      {"model": model, "prompt": "Hello", "max_tokens": 3, **GREEDY})
                assert code == 200 and reply["model"] == "models/base/tiny", reply
    finally:
        load(served, "tiny")


def test_a_client_that_disconnects_stops_its_generation(served):
    before = http("GET", served.server + "/api/model/status")[1]["generations_cancelled"]
    conn = httpclient.HTTPConnection("127.0.0.1", served.server_port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "tiny", "messages": [{"role": "user", "content": "Count forever"}], "max_tokens": 32768,
        "stream": True, **GREEDY}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(4):
        assert response.readline().startswith((b"data: ", b"\n"))
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = http("GET", served.server + "/api/model/status")[1]
        if status["generations_cancelled"] > before and status["active_generations"] == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"not cancelled: {status}")


def test_concurrent_clients_get_their_own_answers(served):
    import concurrent.futures

    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]

    def ask(prompt: str) -> str:
        with openai.OpenAI(base_url=served.server + "/v1", api_key="x", max_retries=0) as c:
            return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=12, **GREEDY).choices[0].message.content

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


async def test_the_api_token_guards_the_v1_routes(tmp_path):
    """With a token configured, /v1 needs it (as the OpenAI client's api_key); checked in process."""
    from aiohttp.test_utils import TestClient, TestServer

    from forgellm.config import load_settings
    from forgellm.gateway.app import BusLink, build_app

    settings = load_settings(env={"FORGELLM_HOME": str(tmp_path), "FORGELLM_SECURITY_API_TOKEN": "s3cret"})
    link = BusLink(settings)
    app, _ = build_app(link, "server")
    try:
        async with TestClient(TestServer(app)) as c:
            response = await c.get("/v1/models")
            assert response.status == 401
            body = await response.json()
            assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
            response = await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
            # past the token: no platform runs here, so the inference service is down (503)
            assert response.status == 503 and (await response.json())["error"]["type"] == "server_error"
    finally:
        link.close()
