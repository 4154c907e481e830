"""Settings: CLI flag > ``FORGELLM_*`` environment > config file > ``default.toml``."""

from forgellm.config.settings import (
    BusSettings,
    GatewaySettings,
    Settings,
    bus_address,
    is_loopback,
    load_settings,
)

__all__ = ["BusSettings", "GatewaySettings", "Settings", "bus_address", "is_loopback", "load_settings"]
