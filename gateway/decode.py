"""Decode REST input into the bus's request Structs, so validation happens once.

Every failure is an ``ApiError`` (400) naming the field and why: malformed JSON, a body that is
not an object, an unknown field, a missing field, a wrong type or an out-of-range value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from forgellm.gateway.errors import ApiError
from forgellm.schemas import ErrorCode

T = TypeVar("T", bound=msgspec.Struct)

_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def field_names(struct_type: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct_type)}


def _invalid(message: str, field: str | None, struct_type: type) -> ApiError:
    details: dict[str, Any] = {"reason": message}
    if field:
        details["field"] = field
    where = f" '{field}'" if field else ""
    return ApiError(
        ErrorCode.INVALID_REQUEST,
        f"Invalid field{where}: {message}" if field else f"Invalid request: {message}",
        details=details,
        suggestion=f"See the {struct_type.__name__} schema in GET /api/openapi.json",
    )


def _integral_floats_as_ints(value: Any) -> Any:
    """``16.0`` -> ``16`` all through a decoded JSON value: JSON (and JSON Schema's "integer")
    does not tell 16 from 16.0, and some clients write every number as a float."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return value


def convert(data: Mapping[str, Any], struct_type: type[T], *, strict: bool = True) -> T:
    unknown = sorted(set(data) - field_names(struct_type) - {"type"})
    if unknown:
        raise _invalid(f"unknown field(s): {', '.join(unknown)}", unknown[0], struct_type)
    try:
        return msgspec.convert(data, struct_type, strict=strict)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "Expected `int`, got `float`" in text:
            try:  # 16.0 for an integer: accepted as 16 (a float field takes an int as well)
                return msgspec.convert(_integral_floats_as_ints(data), struct_type, strict=strict)
            except msgspec.ValidationError as again:
                text = str(again)
        missing = _MISSING.search(text)
        if missing:
            raise _invalid("this field is required", missing.group("field"), struct_type) from None
        at = _AT_PATH.search(text)
        field = at.group("path") if at else None
        message = _AT_PATH.sub("", text)
        raise _invalid(message, field, struct_type) from None


async def decode_body(request: web.Request, struct_type: type[T]) -> T:
    raw = await request.read()  # raises 413 past client_max_size
    if not raw.strip():
        data: Any = {}
    else:
        try:
            data = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise _invalid(f"malformed JSON ({exc})", None, struct_type) from None
    if not isinstance(data, dict):
        raise _invalid(f"the body must be a JSON object, not {type(data).__name__}", None, struct_type)
    return convert(data, struct_type)


def decode_query(request: web.Request, struct_type: type[T]) -> T:
    query = request.query
    duplicated = [key for key in query if len(query.getall(key)) > 1]
    if duplicated:
        raise _invalid("given more than once", duplicated[0], struct_type)
    if any("\x00" in value for value in query.values()):
        raise _invalid("NUL byte in a query value", next(k for k, v in query.items() if "\x00" in v),
                       struct_type)
    return convert(dict(query), struct_type, strict=False)
