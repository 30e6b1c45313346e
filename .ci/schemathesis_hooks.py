"""Schemathesis hooks for kvql (loaded by .ci/schemathesis.sh).

kvql keeps JSON numbers exact: an integer literal outside 64 bits
(-2^63 .. 2^64-1) anywhere in a request body is refused with 400
INVALID_INPUT instead of being rounded (README, "Hostile input"). OpenAPI 3.0
cannot say that of "any JSON value" or of extra object members, so generated
bodies get such integers as strings, which is what a client is told to send.
Members the schema types (`key`, `ttl`, ...) are left alone: there a large
integer is a deliberately wrong type, which kvql must refuse. Everything else
about the generated bodies is left as it is.

`GET /api/changes?wait=S` is a long-poll: with nothing to answer it holds the
request for S seconds (up to 60), as documented, which schemathesis's
response-time limit would report. Generated waits are cut to one second, so
that the poll is still exercised and every other request keeps the limit.
"""

import json
import os

import schemathesis

LOW, HIGH = -(2**63), 2**64 - 1


def _fit(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not LOW <= value <= HIGH:
        return str(value)
    if isinstance(value, list):
        return [_fit(v) for v in value]
    if isinstance(value, dict):
        return {k: _fit(v) for k, v in value.items()}
    return value


def _typed_members():
    """(METHOD, path) -> names of body members (of batch items, for arrays)
    whose type the OpenAPI document states."""
    spec_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "openapi.json")
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    schemas = spec.get("components", {}).get("schemas", {})

    def resolve(schema):
        ref = schema.get("$ref", "")
        return schemas.get(ref.rsplit("/", 1)[-1], {}) if ref else schema

    typed = {}
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                schema = resolve(media.get("schema", {}))
                if schema.get("type") == "array":
                    schema = resolve(schema.get("items", {}))
                typed[(method.upper(), path)] = {
                    name
                    for name, member in schema.get("properties", {}).items()
                    if "type" in resolve(member) or "anyOf" in member or "$ref" in member
                }
    return typed


TYPED = _typed_members()


def _fit_members(value, typed):
    if isinstance(value, dict):
        return {k: (v if k in typed else _fit(v)) for k, v in value.items()}
    return _fit(value)


@schemathesis.hook
def map_body(context, body):
    operation = getattr(context, "operation", None)
    key = (operation.method.upper(), operation.path) if operation is not None else None
    typed = TYPED.get(key, set())
    if isinstance(body, list):
        # Batch items are objects; a batch delete lists keys, which are typed.
        return [_fit_members(item, typed) if isinstance(item, dict) else item for item in body]
    return _fit_members(body, typed)


LONG_POLL_SECONDS = 1


@schemathesis.hook
def map_query(context, query):
    operation = getattr(context, "operation", None)
    if operation is None or (operation.method.upper(), operation.path) != ("GET", "/api/changes"):
        return query
    if isinstance(query, dict) and isinstance(query.get("wait"), int) and not isinstance(query["wait"], bool):
        query = dict(query)
        query["wait"] = min(query["wait"], LONG_POLL_SECONDS)
    return query
