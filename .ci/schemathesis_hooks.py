"""Schemathesis hooks for kvql (loaded by .ci/schemathesis.sh).

kvql keeps JSON numbers exact: an integer literal outside 64 bits
(-2^63 .. 2^64-1) anywhere in a request body is refused with 400
INVALID_INPUT instead of being rounded (README, "Hostile input"). OpenAPI 3.0
cannot say that of "any JSON value" or of extra object members, so generated
bodies get such integers as strings, which is what a client is told to send.
Everything else about the generated bodies is left as it is.
"""

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


@schemathesis.hook
def map_body(context, body):
    return _fit(body)
