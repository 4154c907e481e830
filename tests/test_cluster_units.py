"""The layout of a distributed run and the reading of its launcher's output, without processes:
request -> layout (and its 400s), the mlx.launch command, a rank's end from a line of output,
and which rank the run's error names."""

from __future__ import annotations

import json
import sys

import msgspec
import pytest

from forgellm.config import load_settings
from forgellm.schemas import TrainingStartRequest
from forgellm.services.common.errors import ForgeError
from forgellm.services.common.workspace import Workspace
from forgellm.services.training.cluster import (
    Layout,
    RankExit,
    launcher_argv,
    merge_exit,
    parse_launcher_line,
    rank_failure,
    resolve_layout,
)


def request(**distributed) -> TrainingStartRequest:
    return msgspec.convert({"model_name": "m", "dataset": "d", "batch_size": 4, "distributed": distributed},
                           TrainingStartRequest)


@pytest.fixture
def settings(tmp_path):
    def make(**training):
        env = {"FORGELLM_HOME": str(tmp_path)}
        env.update({f"FORGELLM_TRAINING_{k.upper()}": v for k, v in training.items()})
        return load_settings(env=env)
    return make


def test_local_ranks_and_the_configs_hosts(tmp_path, settings):
    ws = Workspace(tmp_path)
    layout = resolve_layout(ws, request(processes=2), settings())
    assert layout.rank_hosts == ["127.0.0.1", "127.0.0.1"] and layout.backend == "ring" and layout.world_size == 2
    assert layout.launcher == [sys.executable, "-m", "forgellm.services.training.launcher"]  # mlx.launch, quiet
    assert resolve_layout(ws, request(processes=1), settings()) is None  # a world of one: one process
    from_config = resolve_layout(ws, request(), settings(hosts="127.0.0.1,127.0.0.2"))
    assert from_config.rank_hosts == ["127.0.0.1", "127.0.0.2"] and from_config.hosts == ["127.0.0.1", "127.0.0.2"]
    assert from_config.remote_hosts == ["127.0.0.2"]  # mlx.launch starts only 127.0.0.1 without ssh
    again = Layout.from_dict(json.loads(json.dumps(from_config.to_dict())))
    assert again.to_dict() == from_config.to_dict()


def test_hostfile_in_mlx_launch_format(tmp_path, settings):
    (tmp_path / "cluster.json").write_text(json.dumps({"backend": "ring", "hosts": [
        {"ssh": "mac1", "ips": ["127.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]}))
    layout = resolve_layout(Workspace(tmp_path), request(hostfile="cluster.json"), settings())
    assert layout.rank_hosts == ["mac1", "mac2"] and layout.hostfile == str(tmp_path / "cluster.json")
    (tmp_path / "no_ips.json").write_text(json.dumps([{"ssh": "mac1"}, {"ssh": "mac2"}]))
    with pytest.raises(ForgeError) as caught:
        resolve_layout(Workspace(tmp_path), request(hostfile="no_ips.json"), settings())
    assert caught.value.details["field"] == "distributed.hostfile" and "ips" in str(caught.value)
    with pytest.raises(ForgeError) as caught:
        resolve_layout(Workspace(tmp_path), request(hostfile="cluster.json", processes=2), settings())
    assert caught.value.details["field"] == "distributed.processes"


@pytest.mark.parametrize(("distributed", "field", "words"), [
    ({"processes": 3}, "batch_size", "world size 3"),
    ({"hosts": ["127.0.0.1", "127.0.0.1"]}, "distributed.hosts", "twice"),
    ({"hosts": ["127.0.0.1", "gpu-box"], "backend": "ring"}, "distributed.hosts[1]", "IP addresses"),
    ({"hosts": ["192.0.2.7", "127.0.0.1"]}, "distributed.hosts[0]", "must be this machine"),
    ({"processes": 2, "backend": "nccl"}, "distributed.backend", "CUDA"),
])
def test_layouts_refused_with_the_field(tmp_path, settings, distributed, field, words):
    if distributed.get("backend") == "nccl":
        import mlx.core as mx

        if mx.cuda.is_available():
            pytest.skip("this machine has CUDA: nccl is allowed")
    with pytest.raises(ForgeError) as caught:
        resolve_layout(Workspace(tmp_path), request(**distributed), settings())
    assert caught.value.details["field"] == field and words in str(caught.value), str(caught.value)


def test_a_missing_launcher_is_named(tmp_path, settings):
    with pytest.raises(ForgeError) as caught:
        resolve_layout(Workspace(tmp_path), request(processes=2), settings(launcher="no-such-launcher"))
    assert caught.value.details["field"] == "training.launcher"


def test_the_launch_command(tmp_path, settings):
    layout = resolve_layout(Workspace(tmp_path), request(processes=2), settings())
    env = {"FORGELLM_HOME": str(tmp_path), "MALLOC_MMAP_MAX_": "0", "HOME": "/root", "SECRET": "x"}
    argv = launcher_argv(layout, tmp_path / "run", "ckpt.safetensors", "abc", env)
    assert argv[:5] == [*layout.launcher, "--backend", "ring"]
    assert argv[argv.index("--hosts") + 1] == "127.0.0.1" and argv[argv.index("-n") + 1] == "2"
    assert argv[argv.index("--starting-port") + 1] == str(layout.port)
    assert argv[argv.index("--python") + 1] == sys.executable
    passed = [argv[i + 1] for i, a in enumerate(argv) if a == "--env"]
    assert f"FORGELLM_HOME={tmp_path}" in passed and "FORGELLM_LAUNCH_ID=abc" in passed
    assert "MALLOC_MMAP_MAX_=0" in passed and not any(p.startswith(("HOME=", "SECRET=")) for p in passed)
    assert any(p.startswith("OPENBLAS_NUM_THREADS=") for p in passed)  # two ranks share this host's cores
    assert argv[-5:] == ["--", "-m", "forgellm.services.training.worker", str(tmp_path / "run"), "ckpt.safetensors"]


def test_reading_the_launchers_output():
    assert parse_launcher_line("\x1b[33m[WARN] Node with rank 1 exited with code -9 \x1b[0m\n") == RankExit(1, -9)
    marker = 'forgellm-rank-exit {"rank": 0, "host": "127.0.0.1", "kind": "peer_lost", "error": "lost"}'
    assert parse_launcher_line(marker) == RankExit(0, None, "peer_lost", "lost", "127.0.0.1")
    assert parse_launcher_line('{"event": "train", "iteration": 5}') is None
    assert parse_launcher_line("forgellm-rank-exit {not json") is None


def layout2() -> Layout:
    return Layout("ring", ["127.0.0.1", "10.0.0.2"], 1, ["mlx.launch"])


def exits(*seen: RankExit) -> tuple[list[int], dict[int, RankExit]]:
    order, known = [], {}
    for one in seen:
        merge_exit(known, one)
        if one.rank not in order:
            order.append(one.rank)
    return order, known


def test_the_error_names_the_rank_that_failed_not_the_one_that_lost_it():
    # rank 0 notices first that its peer vanished; the cause is rank 1, killed
    order, known = exits(RankExit(0, kind="peer_lost", error="[ring] connection to a peer was lost"),
                         RankExit(0, code=75), RankExit(1, code=-9))
    failure = rank_failure(order, known, layout2())
    assert failure.error == "Training rank 1 of 2 on 10.0.0.2 was killed (SIGKILL)" and failure.resumable
    assert "memory" in failure.suggestion
    order, known = exits(RankExit(1, kind="hang", error="no training step finished for 601 s"), RankExit(1, code=76),
                         RankExit(0, code=-9))
    failure = rank_failure(order, known, layout2())
    assert failure.error.startswith("Training rank 1 of 2 on 10.0.0.2 hung") and failure.resumable
    order, known = exits(RankExit(1, kind="error", error="MemoryError: out of memory"), RankExit(1, code=1),
                         RankExit(0, code=75))
    failure = rank_failure(order, known, layout2())
    assert "rank 1 of 2 on 10.0.0.2 failed: MemoryError" in failure.error and not failure.resumable
    order, known = exits(RankExit(0, kind="peer_lost", error="lost"), RankExit(0, code=75))
    failure = rank_failure(order, known, layout2())  # rank 1 never said how it ended
    assert failure.error.startswith("Training rank 1 of 2 on 10.0.0.2 vanished: rank 0 lost") and failure.resumable
    order, known = exits(RankExit(0, kind="peer_lost", error="lost"), RankExit(1, kind="peer_lost", error="lost"))
    failure = rank_failure(order, known, layout2())  # both lost each other: the network
    assert "lost its connection" in failure.error and "firewall" in failure.suggestion and failure.resumable
    order, known = exits(RankExit(0, kind="peer_lost", error="lost"), RankExit(1, code=255))
    failure = rank_failure(order, known, layout2())  # a remote rank's death, seen through ssh
    assert "rank 1 of 2 on 10.0.0.2 ended abnormally" in failure.error and failure.resumable
    assert rank_failure(*exits(RankExit(0, code=0), RankExit(1, code=0)), layout2()) is None


def test_a_rank_on_a_host_without_the_run_folder_says_so(tmp_path):
    """The real worker, as mlx.launch would start rank 1 on a host where the workspace is not
    shared: its last line names the missing folder, and the run's error names rank and host."""
    import os
    import subprocess

    env = {**os.environ, "MLX_RANK": "1", "FORGELLM_HOME": str(tmp_path), "FORGELLM_LOGGING_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-m", "forgellm.services.training.worker", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    said = [e for e in map(parse_launcher_line, done.stderr.splitlines()) if e]
    assert len(said) == 1 and said[0].rank == 1 and "share the workspace" in said[0].error
    failure = rank_failure(*exits(said[0], RankExit(1, code=1), RankExit(0, kind="peer_lost")), layout2())
    assert failure.error.startswith("Training rank 1 of 2 on 10.0.0.2 failed: no run folder at")
    assert not failure.resumable
