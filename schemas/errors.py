"""The one list of error codes and the error reply every service and the gateway use."""

import enum
from typing import Any

import msgspec

from forgellm.schemas.base import Reply


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    NOT_FOUND = "NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    DATASET_NOT_FOUND = "DATASET_NOT_FOUND"
    RUN_NOT_FOUND = "RUN_NOT_FOUND"
    CHECKPOINT_NOT_FOUND = "CHECKPOINT_NOT_FOUND"
    PATH_OUTSIDE_WORKSPACE = "PATH_OUTSIDE_WORKSPACE"
    TRAINING_ALREADY_RUNNING = "TRAINING_ALREADY_RUNNING"
    NO_TRAINING_RUNNING = "NO_TRAINING_RUNNING"
    MODEL_NOT_LOADED = "MODEL_NOT_LOADED"
    MODEL_LOADING = "MODEL_LOADING"
    INSUFFICIENT_MEMORY = "INSUFFICIENT_MEMORY"
    DISK_FULL = "DISK_FULL"
    UNAUTHORIZED = "UNAUTHORIZED"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    SERVICE_TIMEOUT = "SERVICE_TIMEOUT"
    OFFLINE = "OFFLINE"
    INTERNAL = "INTERNAL"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.DATASET_NOT_FOUND: 404,
    ErrorCode.RUN_NOT_FOUND: 404,
    ErrorCode.CHECKPOINT_NOT_FOUND: 404,
    ErrorCode.PATH_OUTSIDE_WORKSPACE: 403,
    ErrorCode.TRAINING_ALREADY_RUNNING: 409,
    ErrorCode.NO_TRAINING_RUNNING: 409,
    ErrorCode.MODEL_NOT_LOADED: 409,
    ErrorCode.MODEL_LOADING: 409,
    ErrorCode.INSUFFICIENT_MEMORY: 507,
    ErrorCode.DISK_FULL: 507,  # Insufficient Storage
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.NOT_IMPLEMENTED: 501,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.SERVICE_TIMEOUT: 504,
    ErrorCode.OFFLINE: 503,
    ErrorCode.INTERNAL: 500,
}


class ErrorReply(Reply, kw_only=True):
    """A request failed. Mirrors the REST error body of the API reference."""

    code: ErrorCode
    error: str
    details: dict[str, Any] = {}
    suggestion: str = ""


class ErrorBody(msgspec.Struct, kw_only=True):
    """The REST error body (API reference, "Error Response Format")."""

    success: bool = False
    error: str
    error_code: ErrorCode
    details: dict[str, Any] = {}
    suggestion: str = ""
