"""Tests for batchrun.policy.tokens.

Expectations are computed here from first principles with tiktoken (the encoding named
in each case, not the one batchrun picks), so a wrong formula or a wrong model-to-encoding
mapping both show. Offline, it needs TIKTOKEN_CACHE_DIR pointing at a folder with tiktoken's files.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import tiktoken

# The project's tests run offline against the shared cache; default to it if unset.
if (Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache").is_dir():  # else tiktoken downloads
    os.environ.setdefault(
        "TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache")
    )

from batchrun.policy import tokens  # noqa: E402
from batchrun.policy.tokens import (  # noqa: E402
    DEFAULT_MAX_OUTPUT_TOKENS,
    TokenEstimate,
    encoding_for,
    estimate_tokens,
    server_charge_estimate,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"


def count_text(text: str, model: str) -> int:
    """Tokens of ``text`` alone, as the estimate counts them: an embeddings input has no framing."""
    return estimate_tokens(EMBEDDINGS, {"model": model, "input": text}).input_tokens


@pytest.fixture(autouse=True)
def fresh_cache():
    # Each test starts with no cached encodings and no warning given yet, and leaves
    # none behind (a forced-failure None must not leak into later tests).
    tokens.clear_cache()
    yield
    tokens.clear_cache()


def n(encoding: str, text: str) -> int:
    """Tokens in text, straight from tiktoken."""
    return len(tiktoken.get_encoding(encoding).encode_ordinary(text))


def js(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- Request table -----------------------------------------------------------------

WEATHER_FN = {
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
ARGS = '{"city": "Paris", "unit": "celsius"}'
TOOL_RESULT = '{"temperature": 18, "sky": "overcast"}'
SCHEMA = {
    "name": "sentiment",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["pos", "neg", "neutral"]}},
        "required": ["label"],
        "additionalProperties": False,
    },
}
SYSTEM = "You are a helpful assistant that classifies customer reviews."
REVIEW = "The blender arrived two weeks late, but it crushes ice better than my old one."
RUSSIAN = "Привет, мир! Как дела?"

# (id, url, body, expected input tokens as f(encoding name), encoding name, expected output)
CASES = [
    (
        "chat-simple",
        CHAT,
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello, world!"}], "max_tokens": 50},
        lambda e: 3 + n(e, "user") + n(e, "Hello, world!") + 3,
        "o200k_base",
        50,
    ),
    (
        "chat-system-user-max-completion-wins",
        CHAT,
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": REVIEW}],
            "max_completion_tokens": 300,
            "max_tokens": 100,
        },
        lambda e: 2 * 3 + n(e, "system") + n(e, SYSTEM) + n(e, "user") + n(e, REVIEW) + 3,
        "o200k_base",
        300,
    ),
    (
        "chat-with-name",
        CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "name": "alice_smith", "content": REVIEW},
            ],
            "max_tokens": 10,
        },
        lambda e: 2 * 3
        + n(e, "system") + n(e, SYSTEM)
        + n(e, "user") + n(e, "alice_smith") + 1 + n(e, REVIEW)
        + 3,
        "o200k_base",
        10,
    ),
    (
        "chat-images-low-and-high-detail",
        CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What differs between these two photos?"},
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        {"type": "image_url", "image_url": {"url": "https://x.test/c.png", "detail": "high"}},
                    ],
                }
            ],
            "max_tokens": 200,
        },
        lambda e: 3 + n(e, "user") + n(e, "What differs between these two photos?") + 85 + 765 + 765 + 3,
        "o200k_base",
        200,
    ),
    (
        "chat-audio-and-file-parts",
        CHAT,
        {
            "model": "gpt-4o-audio-preview",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Summarise both."},
                        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                        {"type": "file", "file": {"filename": "a.pdf", "file_data": "JVBERi0="}},
                    ],
                }
            ],
            "max_tokens": 100,
        },
        lambda e: 3 + n(e, "user") + n(e, "Summarise both.") + 600 + 1000 + 3,
        "o200k_base",
        100,
    ),
    (
        "chat-tools-and-tool-calls",
        CHAT,
        {
            "model": "gpt-4o",
            "tools": [{"type": "function", "function": WEATHER_FN}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": TOOL_RESULT},
            ],
            "max_tokens": 64,
        },
        lambda e: 3 * 3
        + n(e, "user") + n(e, "Weather in Paris?")
        + n(e, "assistant") + 5 + n(e, "get_weather") + n(e, ARGS)
        + n(e, "tool") + n(e, "call_1") + n(e, TOOL_RESULT)
        + 3
        + 12 + 7 + n(e, js(WEATHER_FN)),
        "o200k_base",
        64,
    ),
    (
        "chat-legacy-functions-and-json-schema",
        CHAT,
        {
            "model": "gpt-4o",
            "functions": [WEATHER_FN],
            "response_format": {"type": "json_schema", "json_schema": SCHEMA},
            "messages": [{"role": "user", "content": REVIEW}],
            "max_tokens": 20,
        },
        lambda e: 3 + n(e, "user") + n(e, REVIEW) + 3 + 12 + 7 + n(e, js(WEATHER_FN)) + n(e, js(SCHEMA)),
        "o200k_base",
        20,
    ),
    (
        "chat-n3-default-output",
        CHAT,
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": REVIEW}], "n": 3},
        lambda e: 3 + n(e, "user") + n(e, REVIEW) + 3,
        "o200k_base",
        3 * DEFAULT_MAX_OUTPUT_TOKENS,
    ),
    (
        "chat-gpt-4-uses-cl100k",
        CHAT,
        {"model": "gpt-4", "messages": [{"role": "user", "content": RUSSIAN}], "max_tokens": 5},
        lambda e: 3 + n(e, "user") + n(e, RUSSIAN) + 3,
        "cl100k_base",
        5,
    ),
    (
        "chat-gpt-4o-uses-o200k",
        CHAT,
        {"model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": RUSSIAN}], "max_tokens": 5},
        lambda e: 3 + n(e, "user") + n(e, RUSSIAN) + 3,
        "o200k_base",
        5,
    ),
    (
        "chat-unknown-model-falls-back-to-o200k",
        CHAT,
        {"model": "acme-llm-2031-preview", "messages": [{"role": "user", "content": RUSSIAN}], "max_tokens": 5},
        lambda e: 3 + n(e, "user") + n(e, RUSSIAN) + 3,
        "o200k_base",
        5,
    ),
    (
        "completions-string-best-of",
        COMPLETIONS,
        {"model": "gpt-3.5-turbo-instruct", "prompt": REVIEW, "max_tokens": 20, "n": 2, "best_of": 3},
        lambda e: n(e, REVIEW),
        "cl100k_base",
        60,
    ),
    (
        "completions-list-of-strings",
        COMPLETIONS,
        {"model": "gpt-3.5-turbo-instruct", "prompt": ["Once upon a time", RUSSIAN], "max_tokens": 30, "n": 2},
        lambda e: n(e, "Once upon a time") + n(e, RUSSIAN),
        "cl100k_base",
        60,
    ),
    (
        "completions-token-array-default-output",
        COMPLETIONS,
        {"model": "davinci-002", "prompt": [9906, 11, 1917, 0]},
        lambda e: 4,
        "cl100k_base",
        DEFAULT_MAX_OUTPUT_TOKENS,
    ),
    (
        "completions-token-arrays-and-suffix",
        COMPLETIONS,
        {"model": "gpt-3.5-turbo-instruct", "prompt": [[1, 2, 3], [4, 5]], "suffix": "The end.", "max_tokens": 8},
        lambda e: 5 + n(e, "The end."),
        "cl100k_base",
        8,
    ),
    (
        "embeddings-string",
        EMBEDDINGS,
        {"model": "text-embedding-3-small", "input": REVIEW},
        lambda e: n(e, REVIEW),
        "cl100k_base",
        0,
    ),
    (
        "embeddings-list-of-strings",
        EMBEDDINGS,
        {"model": "text-embedding-3-large", "input": [REVIEW, RUSSIAN, "x"]},
        lambda e: n(e, REVIEW) + n(e, RUSSIAN) + n(e, "x"),
        "cl100k_base",
        0,
    ),
    (
        "embeddings-token-array",
        EMBEDDINGS,
        {"model": "text-embedding-3-small", "input": [9906, 11, 1917]},
        lambda e: 3,
        "cl100k_base",
        0,
    ),
    (
        "embeddings-token-arrays",
        EMBEDDINGS,
        {"model": "text-embedding-ada-002", "input": [[1, 2, 3, 4], [5], []]},
        lambda e: 5,
        "cl100k_base",
        0,
    ),
    (
        "responses-instructions-and-items",
        RESPONSES,
        {
            "model": "gpt-4.1-mini",
            "instructions": SYSTEM,
            "input": [
                {"role": "user", "content": REVIEW},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "pos"}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "And this one?"},
                        {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "low"},
                        {"type": "input_image", "image_url": "https://x.test/b.png"},
                        {"type": "input_file", "file_id": "file-abc"},
                    ],
                },
                {"type": "function_call", "id": "fc_1", "call_id": "call_9", "name": "get_weather", "arguments": ARGS},
                {"type": "function_call_output", "call_id": "call_9", "output": TOOL_RESULT},
            ],
            "tools": [{"type": "function", **WEATHER_FN}],
            "text": {"format": {"type": "json_schema", **SCHEMA}},
            "max_output_tokens": 500,
        },
        lambda e: (3 + n(e, SYSTEM))
        + 5 * 3
        + n(e, "user") + n(e, REVIEW)
        + n(e, "assistant") + n(e, "pos")
        + n(e, "user") + n(e, "And this one?") + 85 + 765 + 1000
        + n(e, "call_9") + n(e, "get_weather") + n(e, ARGS)
        + n(e, "call_9") + n(e, TOOL_RESULT)
        + 3
        + 12 + 7 + n(e, js({"type": "function", **WEATHER_FN}))
        + n(e, js({"type": "json_schema", **SCHEMA})),
        "o200k_base",
        500,
    ),
    (
        "responses-string-input-default-output",
        RESPONSES,
        {"model": "o3-mini", "input": REVIEW},
        lambda e: 3 + n(e, REVIEW) + 3,
        "o200k_base",
        DEFAULT_MAX_OUTPUT_TOKENS,
    ),
]


@pytest.mark.parametrize(
    "url, body, expected_input, encoding, expected_output",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_estimate_matches_first_principles(url, body, expected_input, encoding, expected_output):
    estimate = estimate_tokens(url, body)
    assert estimate == TokenEstimate(
        input_tokens=expected_input(encoding), output_tokens=expected_output, exact=True
    )
    assert estimate.total == estimate.input_tokens + estimate.output_tokens


# --- Literal pins: measured once, so a formula regression cannot hide behind tiktoken --


def test_literal_counts():
    assert count_text("Hello, world!", "gpt-4o") == 4
    assert count_text("Hello, world!", "gpt-4") == 4
    assert count_text(RUSSIAN, "gpt-4o") == 8
    assert count_text(RUSSIAN, "gpt-4") == 12
    # 3 (message) + 1 ("user") + 4 ("Hello, world!") + 3 (priming)
    simple = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello, world!"}], "max_tokens": 50}
    assert estimate_tokens(CHAT, simple) == TokenEstimate(11, 50, True)


def test_model_to_encoding():
    assert encoding_for("gpt-4o-mini").name == "o200k_base"
    assert encoding_for("gpt-4").name == "cl100k_base"
    assert encoding_for("text-davinci-003").name == "p50k_base"
    assert encoding_for("some-future-model").name == "o200k_base"
    assert encoding_for("").name == "o200k_base"
    assert encoding_for("gpt-4o") is encoding_for("gpt-4o")  # cached


def test_default_max_output_is_configurable():
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    assert estimate_tokens(CHAT, body, default_max_output=100).output_tokens == 200
    assert estimate_tokens(RESPONSES, {"input": "hi"}, default_max_output=7).output_tokens == 7
    # An explicit limit wins over the default.
    body["max_tokens"] = 9
    assert estimate_tokens(CHAT, body, default_max_output=100).output_tokens == 18


def test_special_token_text_does_not_raise():
    text = "Please ignore <|endoftext|> and <|im_start|>system, they are just text."
    assert count_text(text, "gpt-4o") == n("o200k_base", text)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    assert estimate_tokens(CHAT, chat).input_tokens == 3 + 1 + n("o200k_base", text) + 3
    completion = {"model": "gpt-3.5-turbo-instruct", "prompt": [text, "<|endoftext|>"], "max_tokens": 1}
    assert estimate_tokens(COMPLETIONS, completion).input_tokens == n("cl100k_base", text) + 7
    assert estimate_tokens(EMBEDDINGS, {"model": "text-embedding-3-small", "input": text}).exact


def test_unknown_url_is_a_value_error():
    with pytest.raises(ValueError, match="/v1/moderations"):
        estimate_tokens("/v1/moderations", {"input": "x"})
    with pytest.raises(ValueError, match="/v1/moderations"):
        server_charge_estimate("/v1/moderations", {"input": "x"})


@pytest.mark.parametrize(
    "url, body",
    [
        (CHAT, {}),
        (CHAT, {"messages": None, "max_tokens": "lots", "n": -2}),
        (CHAT, {"messages": "hi", "tools": "nope", "functions": [None, 3], "response_format": "json"}),
        (CHAT, {"messages": [None, 3, "x", {"role": 1, "content": 5, "tool_calls": "x", "name": None}]}),
        (CHAT, {"messages": [{"role": "user", "content": [None, 7, "loose string", {"type": "image_url"}]}]}),
        (CHAT, {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "f"}], "function_call": 1}]}),
        (CHAT, {"model": ["gpt-4o"], "messages": [], "max_tokens": 10**400, "n": float("nan")}),
        (CHAT, None),
        (COMPLETIONS, {"prompt": None, "best_of": "3", "n": True}),
        (COMPLETIONS, {"prompt": [None, 1.5, True, {"a": 1}, [1, "x"]]}),
        (EMBEDDINGS, {"input": {"text": "hi"}}),
        (RESPONSES, {"input": [None, "loose", {"content": {"x": 1}}, {"output": 3}], "text": "plain"}),
        (RESPONSES, {"instructions": 5, "input": 5, "tools": [{"type": "web_search"}], "max_output_tokens": 0}),
    ],
)
def test_odd_bodies_do_not_crash(url, body):
    estimate = estimate_tokens(url, body)
    assert estimate.input_tokens >= 0 and estimate.output_tokens >= 0
    assert server_charge_estimate(url, body) >= 0


def test_odd_numbers_fall_back_to_defaults():
    body = {"messages": [], "max_tokens": "lots", "n": -2}
    assert estimate_tokens(CHAT, body).output_tokens == DEFAULT_MAX_OUTPUT_TOKENS
    body = {"messages": [], "max_tokens": 10.2, "n": 2.0}
    assert estimate_tokens(CHAT, body).output_tokens == 22


# --- Server-side second opinion ----------------------------------------------------


def test_server_charge_estimate():
    simple = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello, world!"}], "max_tokens": 50}
    assert server_charge_estimate(CHAT, simple) == math.ceil(len("userHello, world!") / 4) + 50
    tool_body = {"model": "gpt-4o", "tools": [{"type": "function", "function": WEATHER_FN}], "messages": []}
    expected = math.ceil(len(js(WEATHER_FN)) / 4) + DEFAULT_MAX_OUTPUT_TOKENS
    assert server_charge_estimate(CHAT, tool_body) == expected
    tokens_body = {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4]]}
    assert server_charge_estimate(EMBEDDINGS, tokens_body) == 4
    completion = {"prompt": ["abcd", "efghi"], "max_tokens": 3, "n": 2}
    assert server_charge_estimate(COMPLETIONS, completion, default_max_output=1) == 3 + 6


# --- Character fallback when tiktoken cannot load ------------------------------------

# The chars/3 fallback is conservative for English prose only: dense code and non-Latin
# scripts can take more than one token per three characters.
ENGLISH = [
    "Hello, world!",
    REVIEW,
    SYSTEM,
    "Summarise the following support ticket in two sentences, keeping any order numbers intact.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface "
    "while Michael Collins orbited above in the command module.",
]


@pytest.fixture
def no_tiktoken(monkeypatch):
    """Make every encoding load fail the way it does offline with no cache."""
    real = {name: tiktoken.get_encoding(name) for name in ("o200k_base", "cl100k_base")}

    def offline(name):
        raise OSError(f"Failed to resolve 'openaipublic.blob.core.windows.net' for {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokens.clear_cache()
    return real


def n_real(encoding, text: str) -> int:
    return len(encoding.encode_ordinary(text))


def test_fallback_warns_once_and_never_under_counts_english(no_tiktoken, caplog):
    caplog.set_level(logging.WARNING, logger="batchrun.tokens")
    for text in ENGLISH:
        assert count_text(text, "gpt-4o") == math.ceil(len(text) / 3)
        for real in no_tiktoken.values():
            assert count_text(text, "gpt-4o") >= len(real.encode_ordinary(text))
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": REVIEW}], "max_tokens": 5}
    estimate = estimate_tokens(CHAT, body)
    assert estimate.exact is False
    real_input = 3 + n_real(no_tiktoken["cl100k_base"], "user") + n_real(no_tiktoken["cl100k_base"], REVIEW) + 3
    assert estimate.input_tokens >= real_input
    assert estimate.output_tokens == 5
    estimate_tokens(EMBEDDINGS, {"model": "text-embedding-3-small", "input": REVIEW})
    assert encoding_for("some-other-model") is None

    warnings = [r for r in caplog.records if r.name == "batchrun.tokens" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    # one sentence with the fix: no model name (the first lookup need not be the file's) and no
    # exception text (a 480-character ConnectionError); that goes to the debug log
    assert message.startswith("tiktoken could not load its encoding files") and "gpt-4o" not in message
    assert "Failed to resolve" not in message and len(message) < 300
    assert "chars/3" in message and "TIKTOKEN_CACHE_DIR" in message


def test_fallback_token_arrays_stay_exact(no_tiktoken):
    assert estimate_tokens(EMBEDDINGS, {"model": "text-embedding-3-small", "input": [1, 2, 3]}) == TokenEstimate(
        3, 0, True
    )


def test_recurring_texts_count_the_same_from_the_cache():
    from batchrun.policy import tokens

    body = {"model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "system", "content": "You are terse. " * 20},
                         {"role": "user", "content": "x" * (tokens._COUNTED_TEXT_MAX + 1)}]}
    tokens._counts.clear()
    first = estimate_tokens("/v1/chat/completions", body)
    assert tokens._counts  # the short texts were kept, the long one was not
    assert all(len(text) <= tokens._COUNTED_TEXT_MAX for _, text in tokens._counts)
    assert estimate_tokens("/v1/chat/completions", body) == first
    tokens._counts.clear()
    assert estimate_tokens("/v1/chat/completions", body) == first


# --- Properties (hypothesis) -----------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
URLS = [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES]
MODELS = st.sampled_from(["gpt-4o-mini", "gpt-4", "text-embedding-3-small", "gpt-3.5-turbo-instruct", "llama-3-70b", ""])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
KEYS = st.sampled_from(["model", "messages", "prompt", "input", "instructions", "tools", "functions", "max_tokens",
                        "max_completion_tokens", "max_output_tokens", "n", "best_of", "response_format", "text",
                        "content", "role", "name", "tool_calls"])
BODY = st.dictionaries(KEYS | st.text(max_size=8), JSON, max_size=8)
WORD = st.text(st.characters(codec="utf-8", exclude_categories=("Zs", "Cc", "Zl", "Zp", "Cs")), min_size=1, max_size=15)


def with_parts(url: str, model: str, parts: list[str], max_out: int | None) -> dict:
    """A request of ``parts`` (messages, prompts, inputs) on ``url``."""
    body: dict = {"model": model}
    if url == CHAT:
        body["messages"] = [{"role": "user", "content": p} for p in parts]
    elif url == COMPLETIONS:
        body["prompt"] = parts
    elif url == EMBEDDINGS:
        body["input"] = parts
    else:
        body["input"] = [{"role": "user", "content": p} for p in parts]
    if max_out is not None and url != EMBEDDINGS:
        body["max_output_tokens" if url == RESPONSES else "max_tokens"] = max_out
    return body


@PROPERTY
@given(url=st.sampled_from(URLS), body=BODY)
def test_any_body_gives_an_estimate_never_negative(url, body):
    estimate = estimate_tokens(url, body)
    assert estimate.input_tokens >= 0 and estimate.output_tokens >= 0
    assert server_charge_estimate(url, body) >= 0


@PROPERTY
@given(url=st.sampled_from(URLS), model=MODELS, parts=st.lists(st.text(max_size=80), max_size=5),
       more=st.text(min_size=1, max_size=80), max_out=st.none() | st.integers(1, 100_000))
def test_one_more_part_never_lowers_the_estimate(url, model, parts, more, max_out):
    """Monotone in prompt length, a message (prompt, input) more: the estimate never goes down."""
    before = estimate_tokens(url, with_parts(url, model, parts, max_out))
    after = estimate_tokens(url, with_parts(url, model, parts + [more], max_out))
    assert after.input_tokens >= before.input_tokens
    assert after.output_tokens == before.output_tokens
    assert server_charge_estimate(url, with_parts(url, model, parts + [more], max_out)) >= \
        server_charge_estimate(url, with_parts(url, model, parts, max_out))


@PROPERTY
@given(url=st.sampled_from(URLS), model=MODELS, words=st.lists(WORD, min_size=1, max_size=12), more=WORD)
def test_one_more_word_never_lowers_the_estimate(url, model, words, more):
    """Monotone in prompt length, a word more (after a space) in the last part."""
    text = " ".join(words)
    before = estimate_tokens(url, with_parts(url, model, [text], 10))
    after = estimate_tokens(url, with_parts(url, model, [text + " " + more], 10))
    assert after.input_tokens >= before.input_tokens


@PROPERTY
@given(url=st.sampled_from([CHAT, COMPLETIONS, RESPONSES]), model=MODELS, parts=st.lists(st.text(max_size=40), max_size=3),
       low=st.integers(1, 50_000), extra=st.integers(0, 50_000))
def test_a_larger_output_limit_never_lowers_the_estimate(url, model, parts, low, extra):
    before = estimate_tokens(url, with_parts(url, model, parts, low))
    after = estimate_tokens(url, with_parts(url, model, parts, low + extra))
    assert after.output_tokens == before.output_tokens + extra and after.input_tokens == before.input_tokens


def test_a_character_more_can_lower_the_count_as_tiktoken_does():
    """Not a property: byte-pair encoding merges, so a prefix can take more tokens than the word.
    The estimate follows tiktoken (the server counts so too) rather than being monotone in characters."""
    short, word = "internationa", "international"
    assert n("o200k_base", short) > n("o200k_base", word)
    body = lambda text: {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}  # noqa: E731
    assert estimate_tokens(CHAT, body(short)).input_tokens > estimate_tokens(CHAT, body(word)).input_tokens


@PROPERTY
@given(url=st.sampled_from(URLS), text=st.text(max_size=200), more=st.text(min_size=1, max_size=50))
def test_without_tiktoken_the_estimate_is_monotone_in_characters(no_tiktoken, url, text, more):
    before = estimate_tokens(url, with_parts(url, "gpt-4o-mini", [text], 10))
    after = estimate_tokens(url, with_parts(url, "gpt-4o-mini", [text + more], 10))
    assert after.input_tokens >= before.input_tokens >= 0
