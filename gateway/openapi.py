"""``GET /api/openapi.json``, generated from the route table and the schemas' Structs."""

from __future__ import annotations

from typing import Any

import msgspec

from forgellm.gateway.decode import INT_MAX, INT_MIN
from forgellm.gateway.routes import ROUTES, Route
from forgellm.schemas import ErrorBody, HealthReply

_REF = "#/components/schemas/{name}"
NO_NUL = r"^[^\x00]*$"  # as a JSON Schema (ECMA-262) and a Python pattern: no NUL character


def _strip_tag(schema: dict[str, Any]) -> None:
    # Bus messages carry a "type" tag; REST bodies neither need nor send it.
    props = schema.get("properties", {})
    if "type" in props and "enum" in props["type"]:
        props.pop("type")
        schema["required"] = [name for name in schema.get("required", []) if name != "type"]
        if not schema["required"]:
            schema.pop("required")


def _int64(schema: Any) -> None:
    """Every integer is an int64 (gateway/decode.py refuses wider ones: msgpack cannot carry them)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema.setdefault("format", "int64")
            schema.setdefault("minimum", INT_MIN)
            schema.setdefault("maximum", INT_MAX)
        for value in schema.values():
            _int64(value)
    elif isinstance(schema, list):
        for value in schema:
            _int64(value)


def _query_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A field's schema as a query parameter: a query string has no null (an absent parameter is
    the default), and the gateway refuses a NUL byte in any query value (gateway/decode.py)."""
    prop = dict(prop)
    options = prop.get("anyOf")
    if options and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        prop.pop("anyOf")
        if prop.get("default", ...) is None:
            prop.pop("default")
        prop = {**rest[0], **prop} if len(rest) == 1 else {"anyOf": rest, **prop}
    if prop.get("type") == "string" and "pattern" not in prop:
        prop["pattern"] = NO_NUL
    return prop


def _reply_type(route: Route) -> type | None:
    if route.path == "/api/health":
        return HealthReply
    return route.reply


def openapi_document(api: str, server_url: str = "") -> dict[str, Any]:
    routes = [route for route in ROUTES if api in route.apis]
    types = {t for route in routes for t in (route.request, _reply_type(route)) if t is not None}
    types.add(ErrorBody)
    ordered = sorted(types, key=lambda t: t.__name__)
    _, components = msgspec.json.schema_components(ordered, ref_template=_REF)
    for schema in components.values():
        _strip_tag(schema)
        _int64(schema)
    for route in routes:
        if route.request is not None:
            # The gateway refuses unknown fields of a request (gateway/decode.py), so say so.
            components[route.request.__name__]["additionalProperties"] = False

    error_response = {"description": "Error (see error_code)",
                      "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}}}
    paths: dict[str, Any] = {}
    for route in routes:
        reply = _reply_type(route)
        ok: dict[str, Any] = {"description": "Success"}
        if reply is not None:
            ok["content"] = {"application/json": {"schema": {"$ref": _REF.format(name=reply.__name__)}}}
        elif route.path.endswith("openapi.json"):
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        if route.path == "/api/model/generate":  # "streaming": true (gateway/generation.py)
            ok["content"]["application/x-ndjson"] = {"schema": {
                "type": "string",
                "description": 'One JSON object per line: {"token": ...} as tokens are decoded, then the '
                               'GenerateReply fields (or the error body) with "done": true.'}}
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.method.lower() + route.path.replace("/", "_").replace(".", "_"),
            "responses": {"200": ok, "4XX": error_response, "5XX": error_response},
        }
        if route.request is not None:
            schema = components[route.request.__name__]
            if route.method == "GET":
                required = set(schema.get("required", []))
                operation["parameters"] = [
                    {"name": name, "in": "query", "required": name in required, "schema": _query_schema(prop)}
                    for name, prop in schema.get("properties", {}).items()
                ]
            else:
                operation["requestBody"] = {
                    "required": bool(schema.get("required")),
                    "content": {"application/json": {"schema": {"$ref": _REF.format(name=route.request.__name__)}}},
                }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "ForgeLLM " + ("model server API" if api == "server" else "API"), "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document
