"""The bus's network exposure, decided once per process from the settings.

Every process that binds or connects bus sockets calls ``secure_bus(settings)`` before it makes
them: with ``bus.curve`` on, all its tcp sockets use ZeroMQ CURVE (``bus.curve``); a tcp bus on a
non-loopback host without CURVE is refused, as the gateway refuses a public host without a token.
"""

from __future__ import annotations

from pathlib import Path

from forgellm.bus import curve
from forgellm.config import Settings, is_loopback


class InsecureBus(RuntimeError):
    pass


def secure_bus(settings: Settings) -> None:
    bus = settings.bus
    if bus.transport == "tcp" and not is_loopback(bus.tcp_host) and not bus.curve:
        raise InsecureBus(
            f"The bus would listen on {bus.tcp_host}, reachable from other hosts, without encryption or "
            "authentication. Turn on CURVE (FORGELLM_BUS_CURVE=true, certificates from 'forgellm bus keys'), "
            "or keep bus.tcp_host on 127.0.0.1.")
    curve.configure(curve.load_keys(Path(bus.curve_dir)) if bus.curve else None)
