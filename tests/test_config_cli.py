"""Settings precedence and the small CLI commands (`config show`, `bus tail`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from forgellm.config import bus_address, load_settings
from forgellm.config.settings import ConfigError
from tests.helpers.procs import isolated_env


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    (tmp_path / "forgellm.toml").write_text('[gateway]\nweb_port = 6002\nserver_port = 6001\nhost = "127.0.0.2"\n')
    env = isolated_env(tmp_path, FORGELLM_GATEWAY_SERVER_PORT="7001", FORGELLM_GATEWAY_HOST="127.0.0.3")
    settings = load_settings({"gateway": {"host": "127.0.0.4", "web_port": None}}, env=env)
    assert settings.gateway.host == "127.0.0.4"      # flag
    assert settings.gateway.server_port == 7001      # env over file
    assert settings.gateway.web_port == 6002         # file over default (flag None = not given)
    assert settings.timeouts.rpc_s == 5.0            # default
    assert settings.home == tmp_path.resolve()


def test_bad_config_is_a_clear_error(tmp_path):
    (tmp_path / "forgellm.toml").write_text("[gateway]\nwebport = 1\n")
    with pytest.raises(ConfigError, match="unknown key gateway.webport"):
        load_settings(env=isolated_env(tmp_path))
    (tmp_path / "forgellm.toml").write_text("[gateway\n")
    with pytest.raises(ConfigError, match="forgellm.toml"):
        load_settings(env=isolated_env(tmp_path))
    (tmp_path / "forgellm.toml").unlink()
    with pytest.raises(ConfigError, match="FORGELLM_TIMEOUTS_RPC_S"):
        load_settings(env=isolated_env(tmp_path, FORGELLM_TIMEOUTS_RPC_S="soon"))
    with pytest.raises(ConfigError, match="missing file"):
        load_settings(env=isolated_env(tmp_path, FORGELLM_CONFIG=str(tmp_path / "nope.toml")))


def test_bus_addresses_ipc_and_tcp(tmp_path):
    ipc = load_settings(env=isolated_env(tmp_path))
    assert bus_address(ipc, "trainer") == f"ipc://{tmp_path.resolve()}/.forgellm/run/trainer.sock"
    tcp = load_settings(env=isolated_env(tmp_path, FORGELLM_BUS_TRANSPORT="tcp", FORGELLM_BUS_TCP_BASE_PORT="6000"))
    assert [bus_address(tcp, e) for e in ("events_in", "events_out", "trainer")] == [
        "tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002"]
    deep = tmp_path / ("d" * 90)
    assert len(bus_address(load_settings(env=isolated_env(deep)), "publisher")) < 100


def test_config_show_prints_the_settings_in_force(tmp_path):
    out = subprocess.run([sys.executable, "-m", "forgellm", "config", "show", "--json"], capture_output=True,
                         env=isolated_env(tmp_path, FORGELLM_GATEWAY_WEB_PORT="5999",
                                          FORGELLM_SECURITY_API_TOKEN="secret"), check=True, text=True)
    shown = json.loads(out.stdout)
    assert shown["gateway"]["web_port"] == 5999 and shown["security"]["api_token"] == "***"
    toml = subprocess.run([sys.executable, "-m", "forgellm", "config", "show"], capture_output=True,
                          env=isolated_env(tmp_path), check=True, text=True).stdout
    assert "[gateway]" in toml and "web_port = 5002" in toml


def test_bus_tail_shows_live_events(platform):
    out = subprocess.run(
        [sys.executable, "-m", "forgellm", "bus", "tail", "--topic", "service.heartbeat", "--json", "--count", "6"],
        capture_output=True, env=platform.env, check=True, text=True, timeout=30).stdout
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 6 and {e["topic"] for e in events} == {"service.heartbeat"}
    assert {e["type"] for e in events} == {"Heartbeat"}
    assert all(e["seq"] >= 1 and e["data"]["pid"] > 0 for e in events)
    human = subprocess.run([sys.executable, "-m", "forgellm", "bus", "tail", "--count", "2"],
                           capture_output=True, env=platform.env, check=True, text=True, timeout=30).stdout
    assert "service.heartbeat" in human and "Heartbeat" in human
