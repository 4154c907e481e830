"""Load settings from the layered sources and compute bus addresses."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

DEFAULT_FILE = Path(__file__).with_name("default.toml")

# Processes that bind a command socket, in a fixed order (their tcp port offset).
SERVICE_NAMES = ("trainer", "inference", "catalog", "publisher")


class GatewaySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str
    web_port: int
    server_port: int
    max_body_bytes: int
    cors_origins: list[str]
    socketio_ping_interval_s: float
    socketio_ping_timeout_s: float
    socketio_max_backlog: int


class BusSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    transport: str
    run_dir: str
    tcp_host: str
    tcp_base_port: int
    hwm: int
    curve: bool
    curve_dir: str


class TimeoutSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    rpc_s: float
    read_retries: int
    heartbeat_s: float
    heartbeat_timeout_s: float
    stop_grace_s: float


class TrainingSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    hosts: list[str]
    backend: str
    launcher: str
    hang_timeout_s: float
    preflight_timeout_s: float


class WorkspaceSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    home: str


class SecuritySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    api_token: str


class LoggingSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: str
    format: str


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    gateway: GatewaySettings
    bus: BusSettings
    timeouts: TimeoutSettings
    training: TrainingSettings
    workspace: WorkspaceSettings
    security: SecuritySettings
    logging: LoggingSettings

    @property
    def home(self) -> Path:
        return Path(self.workspace.home).resolve()

    @property
    def run_dir(self) -> Path:
        return Path(self.bus.run_dir).resolve()

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class ConfigError(ValueError):
    """A config file, variable or flag has a bad name or value."""


def _parse_env_value(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"expected a boolean, got {raw!r}")
    if isinstance(default, list):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _merge(base: dict[str, Any], layer: Mapping[str, Any], origin: str) -> None:
    for section, values in layer.items():
        if section not in base or not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: unknown section [{section}]")
        for key, value in values.items():
            if key not in base[section]:
                raise ConfigError(f"{origin}: unknown key {section}.{key}")
            base[section][key] = value


def _default_run_dir(home: Path) -> str:
    run_dir = home / ".forgellm" / "run"
    # A unix socket path is limited to ~107 bytes; deep workspaces get a short private folder.
    if len(str(run_dir)) > 80:
        digest = hashlib.sha1(str(home).encode()).hexdigest()[:12]
        run_dir = Path(tempfile.gettempdir()) / f"forgellm-{os.getuid()}-{digest}"
    return str(run_dir)


def load_settings(
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings of this process.

    ``overrides`` are command-line flags as ``{section: {key: value}}`` (None values ignored).
    ``FORGELLM_HOME`` sets the workspace and ``FORGELLM_CONFIG`` names the file; otherwise
    ``forgellm.toml`` in the workspace is read when it exists.
    """
    env = os.environ if env is None else env
    data = tomllib.loads(DEFAULT_FILE.read_text())

    home = env.get("FORGELLM_HOME") or data["workspace"]["home"] or os.getcwd()
    config_file = env.get("FORGELLM_CONFIG") or str(Path(home) / "forgellm.toml")
    if Path(config_file).is_file():
        try:
            _merge(data, tomllib.loads(Path(config_file).read_text()), config_file)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_file}: {exc}") from exc
    elif env.get("FORGELLM_CONFIG"):
        raise ConfigError(f"FORGELLM_CONFIG names a missing file: {config_file}")

    for name, raw in env.items():
        if not name.startswith("FORGELLM_") or name in ("FORGELLM_HOME", "FORGELLM_CONFIG"):
            continue
        rest = name[len("FORGELLM_") :].lower()
        section, _, key = rest.partition("_")
        if section in data and key in data[section]:
            try:
                data[section][key] = _parse_env_value(raw, data[section][key])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
    if env.get("FORGELLM_HOME"):
        data["workspace"]["home"] = env["FORGELLM_HOME"]

    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                _merge(data, {section: {key: value}}, "command line")

    if not data["workspace"]["home"]:
        data["workspace"]["home"] = home
    data["workspace"]["home"] = str(Path(data["workspace"]["home"]).resolve())
    if not data["bus"]["curve_dir"]:
        data["bus"]["curve_dir"] = str(Path(data["workspace"]["home"]) / ".forgellm" / "curve")
    if not data["bus"]["run_dir"]:
        data["bus"]["run_dir"] = _default_run_dir(Path(data["workspace"]["home"]))
    try:
        settings = msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from exc
    if settings.bus.transport not in ("ipc", "tcp"):
        raise ConfigError(f"bus.transport must be 'ipc' or 'tcp', not {settings.bus.transport!r}")
    if settings.training.backend not in ("auto", "ring", "nccl", "mpi"):
        raise ConfigError(f"training.backend must be auto, ring, nccl or mpi, not {settings.training.backend!r}")
    if settings.training.hang_timeout_s <= 0:
        raise ConfigError("training.hang_timeout_s must be above 0")
    return settings


LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine only:
    what the gateway and the bus may bind to without a token or CURVE."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bus_address(settings: Settings, endpoint: str) -> str:
    """Address of ``events_in``, ``events_out`` or a service's command socket."""
    names = ("events_in", "events_out", *SERVICE_NAMES)
    if endpoint not in names:
        raise ValueError(f"unknown bus endpoint {endpoint!r}")
    if settings.bus.transport == "tcp":
        return f"tcp://{settings.bus.tcp_host}:{settings.bus.tcp_base_port + names.index(endpoint)}"
    return f"ipc://{settings.run_dir / endpoint}.sock"
