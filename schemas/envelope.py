"""The header that travels beside every message body."""

import msgspec


class Envelope(msgspec.Struct, kw_only=True, array_like=True):
    """Who sent a message, when, and on behalf of which HTTP request.

    ``seq`` numbers a publisher's events per topic (so a subscriber filtering by topic can see
    a gap); ``instance`` changes when the publisher restarts, so a reset of ``seq`` is not
    mistaken for a loss. For replies ``reply_to`` is the request's ``msg_id`` and ``final`` is
    False on every frame of a streamed reply except the last. A request whose ``deadline``
    (unix time) has passed is dropped by the server: its caller has already given up.
    """

    msg_id: str
    correlation_id: str = ""
    source: str = ""
    instance: str = ""
    ts: float = 0.0
    seq: int = 0
    reply_to: str = ""
    final: bool = True
    deadline: float = 0.0
