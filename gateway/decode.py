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


INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what msgpack carries on the bus (the document says int64)


def _wide_int_at(value: Any, path: str = "") -> str | None:
    """The path of the first integer outside int64 in a decoded JSON value, else None."""
    if type(value) is int:
        return path if not INT_MIN <= value <= INT_MAX else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if type(item) in (int, dict, list):
            where = _wide_int_at(item, f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key))
            if where is not None:
                return where
    return None


def convert(data: Mapping[str, Any], struct_type: type[T], *, strict: bool = True) -> T:
    unknown = sorted(set(data) - field_names(struct_type) - {"type"})
    if unknown:
        raise _invalid(f"unknown field(s): {', '.join(unknown)}", unknown[0], struct_type)
    wide = _wide_int_at(data)
    if wide is not None:  # msgspec takes any Python int, msgpack cannot send it: was a 500
        raise _invalid(f"integer out of range (int64: {INT_MIN} to {INT_MAX})", wide, struct_type)
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
