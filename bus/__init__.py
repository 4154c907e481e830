"""All ZeroMQ code lives here: the broker, event pub/sub and request/reply RPC."""

from forgellm.bus.codec import DecodeError, decode, decode_header, encode, new_id
from forgellm.bus.errors import BusError, RemoteError, ServiceTimeout, ServiceUnavailable
from forgellm.bus.events import AsyncSubscriber, EventPublisher, EventRecord
from forgellm.bus.rpc import AsyncRpcClient, RpcClient, RpcServer

__all__ = [
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
