"""ZeroMQ CURVE for a bus that leaves the host (``bus.transport = "tcp"``, ``bus.curve = true``).

By default the bus is local: ipc sockets in an owner-only folder, or tcp on loopback. A bus that
spans hosts must not be open to the network, so with CURVE on (ZeroMQ RFC 26: Curve25519
encryption and authentication of every connection) every tcp socket of every process uses the
certificates of one folder, made once by ``forgellm bus keys`` and copied to each host:

* ``server.key`` / ``server.key_secret``: the bus's server keypair, used by every socket that
  binds (the broker's two sockets, each service's command socket);
* ``client.key`` / ``client.key_secret``: the platform's client keypair, used by every socket
  that connects (publishers, subscribers, RPC callers: the gateway, the CLI, other services);
* ``authorized/``: the public keys allowed to connect (``client.key`` is put there; add a key to
  let another client in). A binding process runs pyzmq's ZAP authenticator, which refuses any
  handshake from a key not in that folder: without the keys, a peer can neither read nor send.

ipc:// and inproc:// sockets stay as they are (local, protected by file permissions).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = structlog.get_logger("bus.curve")

AUTHORIZED = "authorized"


@dataclass(frozen=True)
class CurveKeys:
    folder: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @property
    def authorized(self) -> Path:
        return self.folder / AUTHORIZED


class CurveKeysMissing(RuntimeError):
    pass


_keys: CurveKeys | None = None
# One authenticator per context that has a CURVE server socket (ZAP is per context).
_authenticators: dict[int, ThreadAuthenticator] = {}


def create_keys(folder: Path) -> CurveKeys:
    """Make the server and client keypairs in ``folder`` (owner-only) and authorize the client."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    (folder / AUTHORIZED).mkdir(exist_ok=True, mode=0o700)
    for name in ("server", "client"):
        if not (folder / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(folder), name)
    shutil.copy(folder / "client.key", folder / AUTHORIZED / "client.key")
    return load_keys(folder)


def load_keys(folder: Path) -> CurveKeys:
    try:
        server_public, server_secret = zmq.auth.load_certificate(str(folder / "server.key_secret"))
        client_public, client_secret = zmq.auth.load_certificate(str(folder / "client.key_secret"))
    except (OSError, ValueError) as exc:
        raise CurveKeysMissing(
            f"bus.curve is on but the CURVE certificates in {folder} cannot be read ({exc}); "
            f"make them with 'forgellm bus keys' and copy the folder to every host") from None
    assert server_secret is not None and client_secret is not None
    return CurveKeys(folder, server_public, server_secret, client_public, client_secret)


def configure(keys: CurveKeys | None) -> None:
    """Use ``keys`` for every tcp socket this process binds or connects from now on."""
    global _keys
    _keys = keys
    if keys is not None:
        log.info("bus_curve_on", folder=str(keys.folder))


def active() -> CurveKeys | None:
    return _keys


def _applies(address: str) -> bool:
    return _keys is not None and address.startswith("tcp://")


def bind(sock: zmq.Socket, address: str) -> None:
    """``sock.bind(address)``, as a CURVE server when CURVE is on and the address is tcp."""
    if _applies(address):
        assert _keys is not None
        _authenticator(sock.context, _keys)
        sock.curve_secretkey = _keys.server_secret
        sock.curve_publickey = _keys.server_public
        sock.curve_server = True
    sock.bind(address)


def connect(sock: zmq.Socket, address: str) -> None:
    """``sock.connect(address)``, as a CURVE client when CURVE is on and the address is tcp."""
    if _applies(address):
        assert _keys is not None
        sock.curve_serverkey = _keys.server_public
        sock.curve_publickey = _keys.client_public
        sock.curve_secretkey = _keys.client_secret
    sock.connect(address)


def _authenticator(ctx: zmq.Context, keys: CurveKeys) -> None:
    if id(ctx) in _authenticators:
        return
    auth = ThreadAuthenticator(ctx, log=None)  # type: ignore[arg-type]
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized))
    _authenticators[id(ctx)] = auth


def stop_authenticators() -> None:
    """Before a context is terminated: its authenticator's thread holds sockets on it."""
    while _authenticators:
        _, auth = _authenticators.popitem()
        auth.stop()
