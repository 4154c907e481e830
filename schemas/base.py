"""Base classes of every bus message."""

from typing import ClassVar

import msgspec


class Message(msgspec.Struct, tag=True, kw_only=True):
    """Anything that travels on the bus. The tag is the class name."""


class Request(Message):
    """A command sent to one service.

    ``idempotent`` requests (reads) may be retried by the client after a timeout; others never
    are, so a slow ``start`` cannot run twice.
    """

    idempotent: ClassVar[bool] = False


class Reply(Message):
    """The answer to a Request (``ErrorReply`` when it failed)."""
