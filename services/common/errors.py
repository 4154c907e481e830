"""The exception service code raises for an expected failure; the service base turns it into
an ``ErrorReply`` (and the gateway into the reference's HTTP error body)."""

from __future__ import annotations

from typing import Any

from forgellm.schemas import ErrorCode, ErrorReply


class ForgeError(Exception):
    def __init__(self, code: ErrorCode, message: str, *, details: dict[str, Any] | None = None,
                 suggestion: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}
        self.suggestion = suggestion

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, error=str(self), details=self.details, suggestion=self.suggestion)
