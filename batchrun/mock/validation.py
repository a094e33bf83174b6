"""Request validation: OpenAI's 400 body for the first problem of a request."""

from __future__ import annotations

from typing import Any

from batchrun.mock.errors import invalid

JSON_TYPES = {
    str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"
}


def _json_type(value: Any) -> str:
    return "null" if value is None else JSON_TYPES.get(type(value), "object")


def _check_int(body: dict, name: str, minimum: int, maximum: int | None = None) -> dict | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return invalid(
            f"Invalid type for '{name}': expected an integer, but got {_json_type(value)} instead.",
            name,
            "invalid_type",
        )
    if value < minimum:
        return invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        return invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return None


def _check_input(body: dict, name: str) -> dict | None:
    """A prompt/input: a string, a list of strings, a list of token ids or a list of such lists."""
    if name not in body:
        return invalid(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    value = body[name]
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        if not value:
            return invalid(f"[] is too short - '{name}'")
        if all(isinstance(v, str) for v in value) or all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return None
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return None
    return invalid(
        f"Invalid type for '{name}': expected a string or an array of strings or tokens, "
        f"but got {_json_type(value)} instead.",
        name,
        "invalid_type",
    )


def _check_messages(body: dict) -> dict | None:
    """A chat request's messages: a non-empty array of objects that each have a role."""
    if "messages" not in body:
        return invalid(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    messages = body["messages"]
    if not isinstance(messages, list):
        return invalid(
            f"Invalid type for 'messages': expected an array of objects, but got "
            f"{_json_type(messages)} instead.",
            "messages",
            "invalid_type",
        )
    if not messages:
        return invalid("[] is too short - 'messages'")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return invalid(
                f"Invalid type for 'messages[{i}]': expected an object, but got "
                f"{_json_type(message)} instead.",
                f"messages[{i}]",
                "invalid_type",
            )
        if "role" not in message:
            return invalid(
                f"Missing required parameter: 'messages[{i}].role'.",
                f"messages[{i}].role",
                "missing_required_parameter",
            )
    return None


def validate(endpoint: str, body: dict) -> dict | None:
    """OpenAI's 400 body for the first problem of the request, or None."""
    if not body.get("model") or not isinstance(body["model"], str):
        return invalid("you must provide a model parameter")
    if endpoint == "embeddings":
        if body.get("encoding_format", "float") not in ("float", "base64"):
            return invalid(
                f"Invalid value for 'encoding_format': must be 'float' or 'base64', got "
                f"{body['encoding_format']!r}.",
                "encoding_format",
                "invalid_value",
            )
        return _check_input(body, "input") or _check_int(body, "dimensions", 1, 3072)
    if endpoint == "responses":
        from batchrun.mock import responses_api

        return responses_api.validate(body)
    problem = _check_messages(body) if endpoint == "chat/completions" else _check_input(body, "prompt")
    if problem:
        return problem
    if body.get("stream_options") is not None and not body.get("stream"):
        return invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            "invalid_value",
        )
    return (
        _check_int(body, "max_tokens", 1)
        or _check_int(body, "max_completion_tokens", 1)
        or _check_int(body, "n", 1, 128)
    )
