"""Errors a bus caller can see. The gateway maps each to an HTTP status."""

from __future__ import annotations

from forgellm.schemas import ErrorCode, ErrorReply


class BusError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, error=str(self), suggestion=getattr(self, "suggestion", ""))


class ServiceUnavailable(BusError):
    """No connection to the service: it is not running (or not reachable)."""

    code = ErrorCode.SERVICE_UNAVAILABLE

    def __init__(self, service: str) -> None:
        super().__init__(f"The {service} service is not running")
        self.service = service
        self.suggestion = "Start the platform with 'forgellm start' (or check its log)."


class ServiceTimeout(BusError):
    """The service is connected but did not answer in time."""

    code = ErrorCode.SERVICE_TIMEOUT

    def __init__(self, service: str, timeout_s: float, tries: int) -> None:
        super().__init__(f"The {service} service did not answer within {timeout_s:g} s ({tries} tries)")
        self.service = service
        self.suggestion = "The service may be busy or stuck; check its log and 'forgellm bus tail'."


class RemoteError(BusError):
    """The service answered with an ``ErrorReply``."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.error)
        self.reply = reply
        self.code = reply.code

    def to_reply(self) -> ErrorReply:
        return self.reply
