"""OpenAPI post-processing: every operation documents the errors it can answer with."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "description": "Every API error: a stable machine-readable code and a human message.",
    "properties": {
        "code": {"type": "string", "example": "not_found"},
        "detail": {"type": "string", "example": "No model named 'demo' in team acme."},
        "fields": {
            "type": "object",
            "description": "Per-field messages, for validation errors.",
            "additionalProperties": True,
        },
    },
    "required": ["code", "detail"],
}
COMMON = {
    "400": "The request is malformed or invalid; `fields` names the problems.",
    "401": "No valid API token (or session).",
    "403": "Your role in the team does not allow this.",
    "404": "No such object in your team (other teams' objects are never revealed).",
    "406": "The response cannot be given in the requested format.",
}
MUTATING = {
    "409": "Conflicts with the current state, or the same Idempotency-Key is still running.",
    "413": "The upload is larger than the server's limit.",
    "415": "The request body's content type is not accepted.",
    "422": "The Idempotency-Key was used before for a different request.",
}


def add_error_responses(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular hook: add the Error component and the error responses."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    reference = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            codes = dict(COMMON)
            if method in ("post", "put", "patch", "delete"):
                codes.update(MUTATING)
            for code, text in codes.items():
                operation["responses"].setdefault(code, {"description": text, "content": reference})
    return result
