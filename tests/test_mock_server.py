"""The mock server, driven by the real openai client (sync and async) over real HTTP.

Its rate limits and faults have their own files: test_mock_server_limits.py, test_mock_server_faults.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

if (Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache").is_dir():  # else tiktoken downloads
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"))

import openai  # noqa: E402
import tiktoken  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from batchrun.cli.mock import mock_server_command  # noqa: E402
from batchrun.mock import MockConfig, MockServerThread, reply_text  # noqa: E402

HI = [{"role": "user", "content": "hi"}]
DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."
WAIT = r"(\d+ms|(?:\d+m)?\d+(?:\.\d+)?s)"


def seconds(duration: str) -> float:
    """Parse a Go duration as OpenAI writes it ("84ms", "6.379s", "1m2.5s")."""
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    minutes, _, secs = duration[:-1].rpartition("m")
    return int(minutes or 0) * 60 + float(secs)


def chat_tokens(model: str, messages: list[dict]) -> int:
    """OpenAI's counting recipe, written out independently of the module under test."""
    enc = tiktoken.encoding_for_model(model)
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(enc.encode(value)) + (1 if key == "name" else 0)
    return total


def raw(srv: MockServerThread, path: str, body: bytes | None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """A request without the openai client, for what the client refuses to send."""
    request = urllib.request.Request(srv.base_url + path, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


@pytest.fixture
def srv():
    with MockServerThread(MockConfig(seed=1)) as server:
        yield server


@pytest.fixture
def client(srv):
    with openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0) as c:
        yield c


# --- helpers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4", "gpt-3.5-turbo-instruct", "some-future-model"])
def test_reply_length_is_between_half_and_full_cap_in_real_tokens(model):
    try:
        enc = tiktoken.encoding_for_model(model)
    except KeyError:
        enc = tiktoken.get_encoding("o200k_base")
    lengths = set()
    for i in range(150):
        cap = 1 + (i * 7) % 120
        body = {"model": model, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": cap}
        text = reply_text("chat/completions", body)
        assert text == reply_text("/v1/chat/completions", body)  # deterministic
        tokens = len(enc.encode(text))
        assert math.ceil(cap / 2) <= tokens <= cap, (cap, text)
        lengths.add(tokens)
    assert len(lengths) > 30  # varied sizes
    default = {"model": model, "messages": HI}
    assert 32 <= len(enc.encode(reply_text("chat/completions", default))) <= 64
    assert len(enc.encode(reply_text("chat/completions", default, default_max_tokens=10))) <= 10


def test_config_validation():
    with pytest.raises(ValueError, match="unknown error kind"):
        MockConfig(error_rates={"404": 0.1})
    with pytest.raises(ValueError, match="within"):
        MockConfig(error_rates={"500": 1.5})
    with pytest.raises(ValueError, match="count"):
        MockConfig(count="words")
    with pytest.raises(ValueError, match="rpm"):
        MockConfig(rpm=0)


# --- answers --------------------------------------------------------------------------------------


def test_chat_answer_shape_content_and_usage(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours.", "name": "bob"},
    ]
    raw_response = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, max_tokens=40
    )
    assert re.fullmatch(r"req_[0-9a-f]{32}", raw_response.headers["x-request-id"])
    assert "x-ratelimit-limit-requests" not in raw_response.headers  # no limit configured
    completion = raw_response.parse()
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    assert completion.system_fingerprint.startswith("fp_")
    assert abs(completion.created - time.time()) < 60
    [choice] = completion.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    content = choice.message.content
    assert content == reply_text("chat/completions", {"model": "gpt-4o-mini", "messages": messages, "max_tokens": 40})
    assert content.startswith("mock:")
    enc = tiktoken.encoding_for_model("gpt-4o-mini")
    assert completion.usage.prompt_tokens == chat_tokens("gpt-4o-mini", messages)
    assert completion.usage.completion_tokens == len(enc.encode(content))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert 20 <= completion.usage.completion_tokens <= 40
    assert choice.finish_reason == ("length" if completion.usage.completion_tokens == 40 else "stop")


def test_n_choices_and_finish_reason_length(client):
    completion = client.chat.completions.create(model="gpt-4o", messages=HI, n=3, max_completion_tokens=1)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.message.content for c in completion.choices} == {"mock"}
    assert {c.finish_reason for c in completion.choices} == {"length"}
    assert completion.usage.completion_tokens == 3


def test_streaming_assembles_to_the_same_answer():
    async def main():
        with MockServerThread() as srv:
            async with openai.AsyncOpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0) as client:
                plain = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=30)
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=HI,
                    max_tokens=30,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [chunk async for chunk in stream]
                return plain, chunks

    plain, chunks = asyncio.run(main())
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert len(chunks) > 10  # token by token
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_shape(client):
    prompts = ["Once upon a time", "The capital of France is"]
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt=prompts, n=2, max_tokens=12)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for choice in completion.choices:
        body = {"model": "gpt-3.5-turbo-instruct", "prompt": prompts[choice.index // 2], "max_tokens": 12}
        assert choice.text == reply_text("completions", body)
    enc = tiktoken.encoding_for_model("gpt-3.5-turbo-instruct")
    assert completion.usage.prompt_tokens == sum(len(enc.encode(p)) for p in prompts)
    assert completion.usage.completion_tokens == sum(len(enc.encode(c.text)) for c in completion.choices)
    single = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hello", max_tokens=5)
    assert len(single.choices) == 1
    streamed = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hello", max_tokens=5, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == single.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_embeddings_shape(client):
    result = client.embeddings.create(model="text-embedding-3-small", input=["a cat", "a dog"])
    assert result.object == "list" and result.model == "text-embedding-3-small"
    assert [d.index for d in result.data] == [0, 1] and {d.object for d in result.data} == {"embedding"}
    assert all(len(d.embedding) == 8 for d in result.data)
    assert abs(sum(v * v for v in result.data[0].embedding) - 1) < 1e-6
    assert result.data[0].embedding != result.data[1].embedding
    enc = tiktoken.encoding_for_model("text-embedding-3-small")
    assert result.usage.prompt_tokens == result.usage.total_tokens == len(enc.encode("a cat")) + len(enc.encode("a dog"))

    again = client.embeddings.create(model="text-embedding-3-small", input="a cat", dimensions=16)
    assert len(again.data[0].embedding) == 16
    tokens = client.embeddings.create(model="text-embedding-3-small", input=[1, 2, 3])
    assert len(tokens.data) == 1 and tokens.usage.prompt_tokens == 3
    lists = client.embeddings.create(model="text-embedding-3-small", input=[[1, 2], [3, 4, 5]])
    assert len(lists.data) == 2 and lists.usage.prompt_tokens == 5

    packed = client.embeddings.create(model="text-embedding-3-small", input="a cat", encoding_format="base64")
    floats = struct.unpack("<8f", base64.b64decode(packed.data[0].embedding))
    assert floats == pytest.approx(result.data[0].embedding, rel=1e-6)


def test_models(client):
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]


def test_concurrent_async_requests_each_get_their_own_answer():
    async def main():
        with MockServerThread() as srv:
            async with openai.AsyncOpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0) as client:
                bodies = [[{"role": "user", "content": f"q{i}"}] for i in range(60)]
                results = await asyncio.gather(
                    *(client.chat.completions.create(model="gpt-4o-mini", messages=m) for m in bodies)
                )
                return bodies, results, srv.stats()

    bodies, results, stats = asyncio.run(main())
    for messages, result in zip(bodies, results):
        assert result.choices[0].message.content == reply_text(
            "chat/completions", {"model": "gpt-4o-mini", "messages": messages}
        )
    assert stats["by_status"] == {"200": 60}


# --- request errors -------------------------------------------------------------------------------


def test_401_without_key(srv):
    status, headers, body = raw(srv, "/chat/completions", json.dumps({"model": "m", "messages": HI}).encode())
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"].startswith("You didn't provide an API key.")
    assert headers["x-request-id"].startswith("req_")


def test_400s(srv, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert info.value.body == {
        "message": "[] is too short - 'messages'",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    auth = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    status, headers, body = raw(srv, "/chat/completions", b"{not json", auth)
    assert status == 400 and body["error"]["message"].startswith("We could not parse the JSON body")
    assert headers["x-request-id"].startswith("req_")
    status, _, body = raw(srv, "/chat/completions", json.dumps({"messages": HI}).encode(), auth)
    assert status == 400 and body["error"]["message"] == "you must provide a model parameter"
    status, _, body = raw(srv, "/chat/completions", json.dumps({"model": "gpt-4o"}).encode(), auth)
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, "messages", "missing_required_parameter")
    status, _, body = raw(srv, "/chat/completions", json.dumps({"model": "gpt-4o", "messages": "hi"}).encode(), auth)
    assert status == 400 and body["error"]["message"].startswith("Invalid type for 'messages'")
    status, _, body = raw(srv, "/embeddings", json.dumps({"model": "e"}).encode(), auth)
    assert status == 400 and body["error"]["message"] == "Missing required parameter: 'input'."
    with pytest.raises(openai.BadRequestError, match="integer below minimum value"):
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        client.post("/nowhere", cast_to=object, body={})
    stats = srv.stats()
    assert stats["by_status"] == {"400": 7, "404": 1} and stats["tokens_charged"] == 0


# --- stats, latency, config -----------------------------------------------------------------------


def test_stats_and_reset():
    with MockServerThread(rpm=2) as srv, openai.OpenAI(base_url=srv.base_url, api_key="sk", max_retries=0) as client:
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
        stats = srv.stats()
        assert stats["requests"] == 3 and stats["requests_admitted"] == 2
        assert stats["by_status"] == {"200": 2, "429": 1} and stats["tokens_charged"] == 12
        assert 5 <= stats["completion_tokens"] <= 10
        assert json.loads(urllib.request.urlopen(srv.base_url.replace("/v1", "/_mock/stats")).read()) == srv.stats()
        srv.reset()
        assert srv.stats()["requests"] == 0 and srv.stats()["per_second"] == []
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # buckets refilled


def test_set_config_changes_limits_and_validates(srv, client):
    client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    srv.set_config(rpm=1)
    client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    srv.set_config(rpm=None)
    client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    with pytest.raises(TypeError):
        srv.set_config(bogus=1)
    with pytest.raises(ValueError):
        srv.set_config(error_rates={"nope": 1.0})


def test_config_endpoint_for_out_of_process_servers(srv, client):
    url = srv.base_url.replace("/v1", "/_mock/config")
    change = urllib.request.Request(url, data=json.dumps({"error_rates": {"503": 1.0}}).encode(), method="POST")
    with urllib.request.urlopen(change) as response:
        assert json.loads(response.read())["error_rates"] == {"503": 1.0}
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    bad = urllib.request.Request(url, data=json.dumps({"rpm": -1}).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad)
    with info.value:
        assert info.value.code == 400


def test_latency():
    with MockServerThread(latency_ms=150) as srv, openai.OpenAI(base_url=srv.base_url, api_key="sk", max_retries=0) as client:
        start = time.monotonic()
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=4)
        assert time.monotonic() - start >= 0.15
        srv.set_config(latency_ms=0, latency_per_token_ms=10)
        start = time.monotonic()
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=20, stream=True)
        stamps = [time.monotonic() - start for _ in stream]
    assert stamps[-1] >= 0.1  # 10 to 20 tokens at 10 ms each
    assert stamps[len(stamps) // 2] < stamps[-1] - 0.03  # spread over the stream, not sent at the end


def test_cli_command():
    runner = CliRunner()
    result = runner.invoke(mock_server_command, ["--help"])
    assert result.exit_code == 0 and "--error-rate" in result.output and "stream_disconnect" in result.output
    for bad in ["404=0.1", "500=2", "500", "500=x"]:
        result = runner.invoke(mock_server_command, ["--error-rate", bad])
        assert result.exit_code == 2 and bad in result.output, result.output
