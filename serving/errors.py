"""Error answers of the HTTP API: what each status means, and a 422 that never fails to encode.

Every error body is `{"detail": ...}`: a string, or for 422 the list of pydantic errors
(`loc`, `msg`, `type`, and `input`/`ctx` made JSON-safe: NaN, ±Infinity, lone surrogates and
other unencodable values are echoed as their repr, long values truncated). The OpenAPI schema
documents each status a route can answer (`responses(...)`).
"""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .schemas import ErrorBody

MEANING = {
    400: "the body is not parseable (e.g. invalid UTF-8, or nested too deep)",
    401: "missing or wrong bearer token",
    408: "the request body did not arrive within LONGER_BODY_TIMEOUT_S",
    409: "the bundle directory holds no loadable bundle; the old model keeps serving",
    413: "the request body is larger than LONGER_MAX_BODY_BYTES",
    503: "the online store is unreachable, or one of the user's keys is unusable (named)",
}
ECHO_LIMIT = 200  # characters of a rejected input echoed back


def responses(*codes: int) -> dict:
    """OpenAPI `responses` for a route: each status with its meaning and the error body."""
    return {c: {"model": ErrorBody, "description": MEANING[c]} for c in codes}


def json_safe(value, depth: int = 0):
    """`value` as something the JSON encoder always accepts (NaN, ±Infinity, lone surrogates,
    bytes and objects become strings; containers are cut short)."""
    if value is None or isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**63):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        text = value[:ECHO_LIMIT]
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("ascii", "replace")
    if depth < 3 and isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in list(value)[:20]]
    if depth < 3 and isinstance(value, dict):
        return {json_safe(str(k), depth + 1): json_safe(v, depth + 1) for k, v in list(value.items())[:20]}
    return json_safe(repr(value)[:ECHO_LIMIT], depth)


def safe_errors(errors) -> list[dict]:
    out = []
    for e in errors:
        item = {
            "loc": [json_safe(p) if isinstance(p, int) else str(json_safe(str(p))) for p in e.get("loc", ())],
            "msg": json_safe(str(e.get("msg", ""))),
            "type": str(e.get("type", "")),
        }
        if "input" in e:
            item["input"] = json_safe(e["input"])
        if e.get("ctx"):
            item["ctx"] = json_safe(e["ctx"])
        out.append(item)
    return out


async def validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": safe_errors(exc.errors())}, status_code=422)


def invalid(field: str | tuple, message: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 for a rule checked outside the request model (e.g. a limit from the settings), in
    the same shape as pydantic's; `field` a name or a path under the body (e.g. ("events", 3,
    "tags"))."""
    loc = field if isinstance(field, tuple) else (field,)
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": kind}])
