"""schemathesis hooks: how to send an `application/x-ndjson` body (an import job's file), which
schemathesis has no serializer for: the generated string as UTF-8 bytes."""

import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()
