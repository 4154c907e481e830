"""All ZeroMQ code lives here: the broker, event pub/sub and request/reply RPC."""


import zmq.asyncio

from forgellm.bus import curve
from forgellm.bus.codec import DecodeError, decode, decode_header, encode, new_id
from forgellm.bus.errors import BusError, RemoteError, ServiceTimeout, ServiceUnavailable
from forgellm.bus.events import AsyncSubscriber, EventPublisher, EventRecord
from forgellm.bus.rpc import AsyncRpcClient, RpcClient, RpcServer


def new_context() -> zmq.asyncio.Context:
    """The sockets' context for one process (or one test): close it with ``destroy()``."""
    return zmq.asyncio.Context()


__all__ = [
    "curve",
    "new_context",
    "AsyncRpcClient",
    "AsyncSubscriber",
    "BusError",
    "DecodeError",
    "EventPublisher",
    "EventRecord",
    "RemoteError",
    "RpcClient",
    "RpcServer",
    "ServiceTimeout",
    "ServiceUnavailable",
    "decode",
    "decode_header",
    "encode",
    "new_id",
]
