"""The mock server's rate limits (batchrun/mock/limits.py), driven by the real openai client."""

from __future__ import annotations

import math
import re
import time

import openai
import pytest
import tiktoken

from batchrun.mock import MockServerThread, go_duration
from tests.test_mock_server import DOCS, HI, WAIT, seconds


@pytest.mark.parametrize(
    ("secs", "text"),
    [
        (0, "0s"),
        (0.0001, "1ms"),
        (0.02, "20ms"),
        (0.084, "84ms"),
        (0.9999, "1s"),
        (1, "1s"),
        (1.146, "1.146s"),
        (6.379, "6.379s"),
        (6.3791, "6.38s"),
        (62.5, "1m2.5s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_go_duration(secs, text):
    assert go_duration(secs) == text


# --- rate limits ----------------------------------------------------------------------------------


def test_rpm_limit_gives_openais_429():
    with MockServerThread(rpm=3) as srv, openai.OpenAI(base_url=srv.base_url, api_key="sk-a", max_retries=0) as client:
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=10)
        err = info.value
        match = re.fullmatch(
            r"Rate limit reached for gpt-4o-mini in organization org-mock on requests per min \(RPM\): "
            rf"Limit 3, Used 3, Requested 1\. Please try again in {WAIT}\. {re.escape(DOCS)}",
            err.body["message"],
        )
        assert match, err.body["message"]
        assert 19 < seconds(match[1]) <= 20  # one request refills in 60/3 s
        assert (err.type, err.code, err.body["param"]) == ("requests", "rate_limit_exceeded", None)
        headers = err.response.headers
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 55 < seconds(headers["x-ratelimit-reset-requests"]) <= 60
        assert "x-ratelimit-limit-tokens" not in headers and "retry-after-ms" not in headers
        # Buckets are per key and per model.
        client.chat.completions.create(model="gpt-4o", messages=HI)
        client.with_options(api_key="sk-b").chat.completions.create(model="gpt-4o-mini", messages=HI)
        stats = srv.stats()
    assert stats["by_status"] == {"200": 5, "429": 1}
    assert stats["rate_limited"]["requests"] == 1
    assert stats["tokens_charged"] == 3 * 11 + 2 * 65  # the refused request charged nothing


def test_tpm_limit_message_and_headers():
    with MockServerThread(tpm=1000) as srv, openai.OpenAI(base_url=srv.base_url, api_key="sk", max_retries=0) as client:
        for _ in range(3):  # "hi" is ceil(2/4) = 1 token + 300 output
            response = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=300)
        assert response.headers["x-ratelimit-limit-tokens"] == "1000"
        remaining = int(response.headers["x-ratelimit-remaining-tokens"])
        assert 97 <= remaining <= 120  # 1000 - 3 x 301, plus what refilled meanwhile
        reset = seconds(response.headers["x-ratelimit-reset-tokens"])
        assert reset == pytest.approx((1000 - remaining) * 60 / 1000, abs=0.07)  # until full again
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=300)
    match = re.fullmatch(
        r"Rate limit reached for gpt-4o-mini in organization org-mock on tokens per min \(TPM\): "
        rf"Limit 1000, Used (\d+), Requested 301\. Please try again in {WAIT}\. {re.escape(DOCS)}",
        info.value.body["message"],
    )
    assert match, info.value.body["message"]
    used = int(match[1])
    assert used + 301 > 1000 and used <= 903
    # The exact wait: the missing tokens at 1000/60 per second (Used is rounded, hence the slack).
    assert seconds(match[2]) == pytest.approx((301 - (1000 - used)) * 0.06, abs=0.07)
    assert info.value.type == "tokens" and info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["x-ratelimit-limit-tokens"] == "1000"


def test_waiting_the_advertised_time_is_enough():
    # 600 RPM with a 0.1 s burst: a bucket of one request, refilled every 100 ms.
    with MockServerThread(rpm=600, burst_seconds=0.1, retry_after_header=True) as srv, openai.OpenAI(
        base_url=srv.base_url, api_key="sk", max_retries=0
    ) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=HI)
        wait = seconds(re.search(rf"try again in {WAIT}\.", info.value.message)[1])
        assert 0 < wait <= 0.1
        headers = info.value.response.headers
        assert int(headers["retry-after-ms"]) == round(wait * 1000) and headers["retry-after"] == "1"
        time.sleep(wait)
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)


def test_request_too_large():
    with MockServerThread(tpm=1000) as srv, openai.OpenAI(base_url=srv.base_url, api_key="sk", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2000)
        assert info.value.body == {
            "message": "Request too large for gpt-4o in organization org-mock on tokens per min (TPM): "
            "Limit 1000, Requested 2001. The input or output tokens must be reduced in order to run "
            "successfully. " + DOCS,
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=900)  # charged nothing
        assert srv.stats()["rate_limited"]["too_large"] == 1


@pytest.mark.parametrize("count", ["chars", "tiktoken"])
def test_admission_charge(count):
    messages = [{"role": "user", "content": "Tell me about the weather in Paris today, please."}]
    with MockServerThread(count=count, default_max_tokens=50) as srv, openai.OpenAI(
        base_url=srv.base_url, api_key="sk", max_retries=0
    ) as client:
        short = client.chat.completions.create(model="gpt-4o-mini", messages=messages, n=2)
        client.embeddings.create(model="text-embedding-3-small", input=["abcdefghi"])
        client.embeddings.create(model="text-embedding-3-small", input=[1, 2, 3])
        stats = srv.stats()
    chat_prompt = math.ceil(len(messages[0]["content"]) / 4) if count == "chars" else short.usage.prompt_tokens
    enc = tiktoken.encoding_for_model("text-embedding-3-small")
    embed_prompt = (3 if count == "chars" else len(enc.encode("abcdefghi"))) + 3  # token ids count as such
    # The charge uses the cap (50 x n), not the shorter answer: no refund.
    assert short.usage.completion_tokens < 100
    assert stats["tokens_charged"] == chat_prompt + 50 * 2 + embed_prompt
    per_second = stats["per_second"]  # [[unix second, admitted, tokens, refused]]; two if a second ticked over
    assert 1 <= len(per_second) <= 2 and abs(per_second[0][0] - time.time()) < 5
    assert [sum(col) for col in zip(*per_second)][1:3] == [3, stats["tokens_charged"]]
