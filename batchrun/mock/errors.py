"""OpenAI's error bodies, word for word, as the mock answers them."""

from __future__ import annotations


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> dict:
    return error_body(message, "invalid_request_error", param, code)


SERVER_ERROR = error_body(
    "The server had an error while processing your request. Sorry about that!", "server_error"
)
OVERLOADED = error_body("The engine is currently overloaded, please try again later.", "server_error")
INSUFFICIENT_QUOTA = error_body(
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
    "insufficient_quota",
    None,
    "insufficient_quota",
)
MISSING_KEY = invalid(
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (i.e. "
    "Authorization: YOUR_KEY) when using HTTP Basic auth. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys.",
    code="invalid_api_key",
)
BAD_JSON = invalid(
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
    "not valid JSON. If you have trouble figuring out how to fix this, please contact us through "
    "our help center at help.openai.com.)"
)
