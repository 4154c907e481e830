"""`forgellm train` on a real terminal: standalone and through a running platform, Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pexpect
import pytest

from tests.helpers.procs import Platform, isolated_env
from tests.helpers.tiny_lm import write_corpus, write_tiny_model

ARGS = ["--model", "tiny", "--dataset", "grammar", "--batch-size", "4", "--learning-rate", "0.002",
        "--max-seq-length", "64", "--steps-per-report", "10"]


@pytest.fixture(scope="module")
def workspace():
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        home = Path(name)
        write_tiny_model(home / "models" / "base" / "tiny")
        write_corpus(home / "dataset" / "grammar")
        yield home


def test_standalone_run_shows_progress_and_finishes(workspace):
    out = subprocess.run([sys.executable, "-m", "forgellm", "train", *ARGS, "--max-iterations", "30",
                          "--save-every", "10", "--standalone"], env=isolated_env(workspace), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("no platform running: training standalone (cpt_")
    assert any(line.startswith("iter 30/30") and "loss" in line and "tok/s" in line for line in lines)
    assert "finished: completed; best checkpoints" in lines[-1]


def test_standalone_distributed_run_on_two_local_ranks(workspace):
    out = subprocess.run([sys.executable, "-m", "forgellm", "train", *ARGS, "--max-iterations", "20",
                          "--save-every", "10", "--processes", "2", "--backend", "ring", "--standalone"],
                         env=isolated_env(workspace), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == "2 ranks on 127.0.0.1 (ring)", lines
    assert any(line.startswith("iter 20/20") for line in lines) and "finished: completed" in lines[-1]
    run_dir = workspace / lines[0].split("-> ")[1]
    config = json.loads((run_dir / "training_config.json").read_text())
    assert config["distributed"] == {"processes": 2, "hosts": [], "backend": "ring", "hostfile": None}
    assert config["layout"]["world_size"] == 2


def test_distributed_settings_are_refused_before_anything_runs(workspace):
    out = subprocess.run([sys.executable, "-m", "forgellm", "train", *ARGS, "--batch-size", "3", "--processes", "2",
                          "--standalone"], env=isolated_env(workspace), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "world size 2" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "forgellm", "train", *ARGS, "--processes", "2", "--standalone"],
                         env=isolated_env(workspace, FORGELLM_TRAINING_LAUNCHER="no-such-launcher"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "'no-such-launcher' was not found" in out.stderr, out.stderr


def test_bad_settings_are_refused_before_anything_runs(workspace):
    out = subprocess.run([sys.executable, "-m", "forgellm", "train", *ARGS, "--batch-size", "0", "--standalone"],
                         env=isolated_env(workspace), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "batch_size" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "forgellm", "train", "--model", "nope", "--dataset", "grammar",
                          "--standalone"], env=isolated_env(workspace), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Model not found" in out.stderr


def test_through_the_platform_ctrl_c_offers_stop_or_detach(workspace):
    platform = Platform(workspace).start()
    try:
        platform.wait_healthy()
        env = {**platform.env, "FORGELLM_GATEWAY_WEB_PORT": str(platform.web_port)}
        child = pexpect.spawn(sys.executable, ["-m", "forgellm", "train", *ARGS, "--max-iterations", "100000",
                                               "--save-every", "1000"], env=env, encoding="utf-8", timeout=60)
        child.expect(r"training (cpt_\d+_\d+) -> models/cpt/")
        child.expect(r"iter \d+/100000 .* loss")
        child.sendintr()
        child.expect(r"Stop the run .* or detach")
        child.sendline("stop")
        child.expect("Training (stopped successfully|is stopping)")
        child.expect(pexpect.EOF)
        platform.wait_until(lambda h: h["components"]["training_pipeline"] == "idle", 30, "run stopped")
    finally:
        platform.stop()
        platform.kill_everything()
