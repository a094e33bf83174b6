"""Tests for batchrun.ops.estimate and the ``batchrun estimate`` command.

Token counts are checked two ways: against tiktoken called here (the encoding named in the
test), and against ``estimate_tokens`` job by job, so that the batched, deduplicated and
multi-process counting can never drift from what the shared budget counts. Costs are checked
against sums written out by hand, on completions whose prompts are token arrays (their token
counts need no tokenizer). Offline, it needs TIKTOKEN_CACHE_DIR pointing at a folder with tiktoken's files.

``BATCHRUN_MEASURE_SPEED=1 ... pytest tests/test_estimate.py -k speed -s`` measures lines per
second on a generated 100,000-line chat file (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiktoken

if (Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache").is_dir():  # else tiktoken downloads
    os.environ.setdefault(
        "TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache")
    )

from click.testing import CliRunner  # noqa: E402

from batchrun.ops import estimate, token_count  # noqa: E402

from batchrun.policy import tokens
from batchrun.cli.main import main  # noqa: E402
from batchrun.cli.estimate_text import render_text  # noqa: E402
from batchrun.ops.estimate import estimate_file, shortest_minutes  # noqa: E402
from batchrun.policy.pricing import ENV_PRICES, Price, PriceTable  # noqa: E402
from batchrun.settings import Limits  # noqa: E402
from batchrun.policy.tokens import estimate_tokens  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.delenv(ENV_PRICES, raising=False)
    tokens.clear_cache()
    yield
    tokens.clear_cache()


def n(encoding: str, text: str) -> int:
    """Tokens in text, straight from tiktoken."""
    return len(tiktoken.get_encoding(encoding).encode_ordinary(text))


def line(custom_id: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(model: str, system: str, user: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": user}], **extra}


def ids(count: int) -> list[int]:
    """A prompt given as token ids: exactly ``count`` input tokens, no tokenizer involved."""
    return [1000 + i % 50_000 for i in range(count)]


SYSTEM = "You are a careful assistant. Answer in one short sentence."
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Name a prime number larger than 100.", "Привет! Как дела?"]

# --- Token counts ------------------------------------------------------------------


def test_input_tokens_per_model_match_tiktoken(tmp_path):
    rows = [line(f"a{i}", chat("gpt-4o-mini", SYSTEM, q, max_tokens=40)) for i, q in enumerate(QUESTIONS)]
    rows += [line(f"b{i}", chat("gpt-3.5-turbo", SYSTEM, q, max_tokens=10, n=2)) for i, q in enumerate(QUESTIONS[:2])]
    report = estimate_file(write_jsonl(tmp_path / "jobs.jsonl", rows))

    by_model = {m.model: m for m in report.models}
    assert list(by_model) == ["gpt-3.5-turbo", "gpt-4o-mini"]  # sorted by name

    def expected(encoding: str, questions: list[str]) -> int:
        # per chat: 2 messages x 3 framing + role and content tokens + 3 to prime the reply
        return sum(2 * 3 + n(encoding, "system") + n(encoding, SYSTEM) + n(encoding, "user") + n(encoding, q) + 3
                   for q in questions)

    mini, turbo = by_model["gpt-4o-mini"], by_model["gpt-3.5-turbo"]
    assert mini.input_tokens == expected("o200k_base", QUESTIONS)
    assert turbo.input_tokens == expected("cl100k_base", QUESTIONS[:2])
    assert mini.input_exact and turbo.input_exact
    assert mini.jobs == 4 and dict(mini.jobs_by_url) == {CHAT: 4}
    assert mini.max_output_tokens == 4 * 40
    assert turbo.max_output_tokens == 2 * 10 * 2  # max_tokens x n
    assert report.jobs == 6 and report.input_tokens == mini.input_tokens + turbo.input_tokens
    assert report.invalid_lines == 0 and report.errors == ()


WEATHER = {"name": "get_weather", "description": "Weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

# Every kind of request estimate_tokens walks: tools, tool calls, names, images, response formats,
# responses items, embeddings and completions as strings and as token arrays, n / best_of.
VARIED = [
    (CHAT, chat("gpt-4o", SYSTEM, "Weather in Paris?", tools=[{"type": "function", "function": WEATHER}])),
    (CHAT, {"model": "gpt-4o", "messages": [
        {"role": "user", "name": "alice", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "x", "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"t": 18}'}],
        "max_completion_tokens": 77, "n": 3}),
    (CHAT, chat("gpt-4.1-mini", SYSTEM, "Label: great product!",
                response_format={"type": "json_schema", "json_schema": {"name": "l", "schema": {"type": "object"}}})),
    (RESPONSES, {"model": "o4-mini", "instructions": SYSTEM, "input": "Summarise the plot of Hamlet.",
                 "max_output_tokens": 300}),
    (RESPONSES, {"model": "gpt-5", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]}),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": ["first text", "second text", "Привет"]}),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]]}),
    (COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time", "max_tokens": 20, "n": 2,
                   "best_of": 3}),
    (COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": ids(17), "suffix": "The end."}),
    (CHAT, chat("some-new-model", SYSTEM, "Unknown models count with o200k_base.")),
]


def varied_rows(copies: int) -> list[dict]:
    rows = []
    for c in range(copies):
        for i, (url, body) in enumerate(VARIED):
            body = json.loads(json.dumps(body))
            if url == CHAT and "messages" in body:  # some unique text per copy, some repeated
                body["messages"].append({"role": "user", "content": f"Copy number {c}, request {i}."})
            rows.append(line(f"r{c}-{i}", body, url))
    return rows


def per_model_from_estimate_tokens(rows: list[dict]) -> dict[str, tuple[int, int]]:
    sums: dict[str, tuple[int, int]] = {}
    for row in rows:
        est = estimate_tokens(row["url"], row["body"])
        i, o = sums.get(row["body"]["model"], (0, 0))
        sums[row["body"]["model"]] = (i + est.input_tokens, o + est.output_tokens)
    return sums


@pytest.mark.parametrize("workers, chunk_chars", [(0, 1_000_000), (0, 200), (2, 300)])
def test_counts_identical_to_estimate_tokens(tmp_path, monkeypatch, workers, chunk_chars):
    # Small chunks exercise chunking and the memory of repeated texts; workers=2 the processes.
    monkeypatch.setattr(token_count, "CHUNK_CHARS", chunk_chars)
    started = []
    real_start = token_count.start_pool
    monkeypatch.setattr(token_count, "start_pool", lambda *a: started.append(real_start(*a)) or started[-1])
    rows = varied_rows(copies=30)
    report = estimate_file(write_jsonl(tmp_path / "jobs.jsonl", rows), workers=workers)
    got = {m.model: (m.input_tokens, m.max_output_tokens) for m in report.models}
    assert got == per_model_from_estimate_tokens(rows)
    if workers:
        if not token_count.fork_is_safe():
            pytest.skip("worker processes are not used here (not Linux, or other threads run)")
        assert started[0][0] is not None, "the worker processes were not used"


def test_bare_bodies_use_the_endpoint(tmp_path):
    rows = [{"model": "text-embedding-3-large", "input": "hello world", "metadata": {"custom_id": "e1"}},
            {"model": "text-embedding-3-large", "input": ["a", "b c"]}]
    report = estimate_file(write_jsonl(tmp_path / "jobs.jsonl", rows), endpoint=EMBEDDINGS)
    (m,) = report.models
    assert dict(m.jobs_by_url) == {EMBEDDINGS: 2}
    assert m.input_tokens == n("cl100k_base", "hello world") + n("cl100k_base", "a") + n("cl100k_base", "b c")
    assert m.max_output_tokens == 0


def test_unknown_endpoint_is_a_value_error(tmp_path):
    path = write_jsonl(tmp_path / "jobs.jsonl", [])
    with pytest.raises(ValueError, match="unknown endpoint"):
        estimate_file(path, endpoint="/v1/nope")


def test_without_tiktoken_counts_characters_as_the_budget_does(tmp_path, monkeypatch):
    rows = [line(f"a{i}", chat("gpt-4o-mini", SYSTEM, q)) for i, q in enumerate(QUESTIONS)]
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)

    def no_encoding(name):
        raise OSError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", no_encoding)
    tokens.clear_cache()
    report = estimate_file(path)
    (m,) = report.models
    assert not m.input_exact
    assert m.input_tokens == sum(estimate_tokens(r["url"], r["body"]).input_tokens for r in rows)
    assert "by characters" in render_text(report)


# --- Output and cost ---------------------------------------------------------------

PRICES = PriceTable(as_of="2026-01-01", prices={"gpt-4o-mini": Price(input=2.0, cached_input=1.0, output=8.0)})


def completions_file(tmp_path: Path) -> Path:
    # Token-array prompts: job 1 has 1000 input tokens and reserves 500 x n=2 = 1000 output tokens;
    # job 2 has 3000 input tokens and reserves 250. Totals: 4000 input, 1250 maximum output.
    rows = [line("c1", {"model": "gpt-4o-mini", "prompt": ids(1000), "max_tokens": 500, "n": 2}, COMPLETIONS),
            line("c2", {"model": "gpt-4o-mini", "prompt": ids(3000), "max_tokens": 250}, COMPLETIONS)]
    return write_jsonl(tmp_path / "jobs.jsonl", rows)


def test_cost_range_by_hand(tmp_path):
    path = completions_file(tmp_path)
    (m,) = estimate_file(path, prices=PRICES).models
    assert (m.input_tokens, m.max_output_tokens, m.tokens_charged) == (4000, 1250, 5250)
    assert m.typical_output_tokens is None
    # low: 4000 x 2.0/1M = 0.008, no output; high: 0.008 + 1250 x 8.0/1M = 0.008 + 0.010 = 0.018
    assert m.cost_low == pytest.approx(0.008)
    assert m.cost_high == pytest.approx(0.018)

    (m,) = estimate_file(path, prices=PRICES, typical_output=100).models
    # typical: job 1 100 x n=2 = 200, job 2 100: 300 tokens; low = 0.008 + 300 x 8.0/1M = 0.0104
    assert m.typical_output_tokens == 300
    assert m.cost_low == pytest.approx(0.0104)
    assert m.cost_high == pytest.approx(0.018)


def test_typical_output_never_exceeds_the_maximum(tmp_path):
    (m,) = estimate_file(completions_file(tmp_path), prices=PRICES, typical_output=400).models
    # job 1: min(400 x 2, 1000) = 800; job 2: min(400, 250) = 250
    assert m.typical_output_tokens == 1050
    # 0.008 + 1050 x 8.0/1M = 0.008 + 0.0084 = 0.0164
    assert m.cost_low == pytest.approx(0.0164)


def test_typical_output_counts_answers_per_endpoint(tmp_path):
    rows = [line("a", chat("gpt-4o-mini", "s", "u", n=3, max_tokens=1000)),
            line("b", {"model": "gpt-4o-mini", "prompt": "p", "n": 2, "best_of": 4, "max_tokens": 1000}, COMPLETIONS),
            line("c", {"model": "gpt-4o-mini", "input": "i", "max_output_tokens": 1000}, RESPONSES),
            line("d", {"model": "gpt-4o-mini", "input": "e"}, EMBEDDINGS)]
    (m,) = estimate_file(write_jsonl(tmp_path / "jobs.jsonl", rows), typical_output=10).models
    assert m.typical_output_tokens == 10 * 3 + 10 * 4 + 10 + 0


def test_unknown_model_has_no_price_and_is_left_out_of_the_total(tmp_path):
    rows = [line("c1", {"model": "gpt-4o-mini", "prompt": ids(1000), "max_tokens": 500}, COMPLETIONS),
            line("c2", {"model": "my-llama", "prompt": ids(10), "max_tokens": 5}, COMPLETIONS)]
    report = estimate_file(write_jsonl(tmp_path / "jobs.jsonl", rows), prices=PRICES)
    llama = next(m for m in report.models if m.model == "my-llama")
    assert llama.price is None and llama.cost_low is None and llama.cost_high is None
    assert report.unpriced_models == ["my-llama"]
    # only gpt-4o-mini: 1000 x 2.0/1M = 0.002; + 500 x 8.0/1M = 0.004 -> 0.006
    assert report.cost_low == pytest.approx(0.002) and report.cost_high == pytest.approx(0.006)
    text = render_text(report)
    assert "no price known (add it with --prices FILE)" in text
    assert "without my-llama" in text


def test_snapshot_names_get_their_alias_price(tmp_path):
    rows = [line("c1", {"model": "gpt-4o-mini-2024-07-18", "prompt": ids(1000), "max_tokens": 10}, COMPLETIONS)]
    (m,) = estimate_file(write_jsonl(tmp_path / "jobs.jsonl", rows), prices=PRICES).models
    assert m.price == PRICES.prices["gpt-4o-mini"]


# --- Wall time ---------------------------------------------------------------------


def test_shortest_minutes():
    # 100 requests at 50 RPM = 2.0 min; 50,000 tokens at 100,000 TPM = 0.5 min: RPM binds
    assert shortest_minutes(100, 50_000, 50, 100_000) == (2.0, "rpm")
    # 300,000 tokens at 100,000 TPM = 3.0 min beats 2.0 min: TPM binds
    assert shortest_minutes(100, 300_000, 50, 100_000) == (3.0, "tpm")
    assert shortest_minutes(100, 300_000, 0, 100_000) == (3.0, "tpm")  # 0: no limit
    assert shortest_minutes(100, 300_000, 25, 0) == (4.0, "rpm")
    assert shortest_minutes(100, 300_000, 0, 0) == (None, None)


def test_wall_time_per_model_with_model_and_bare_limits(tmp_path):
    rows = [line("c1", {"model": "gpt-4o-mini", "prompt": ids(1000), "max_tokens": 500, "n": 2}, COMPLETIONS),
            line("c2", {"model": "gpt-4o-mini", "prompt": ids(3000), "max_tokens": 250}, COMPLETIONS),
            line("e1", {"model": "text-embedding-3-small", "input": ids(600)}, EMBEDDINGS)]
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    limits = Limits.parse(rpm=["4", "gpt-4o-mini=2"], tpm=["gpt-4o-mini=5250"])
    report = estimate_file(path, limits=limits)
    mini = next(m for m in report.models if m.model == "gpt-4o-mini")
    emb = next(m for m in report.models if m.model == "text-embedding-3-small")
    # gpt-4o-mini: 2 requests at 2 RPM = 1.0 min; 5250 tokens at 5250 TPM = 1.0 min; tie -> TPM
    # (each job fits in 5250 TPM: c2, the larger, needs 3250 tokens)
    assert (mini.rpm, mini.tpm, mini.minutes, mini.binding_limit) == (2, 5250, 1.0, "tpm")
    # embeddings: the bare --rpm 4 only: 1 request / 4 = 0.25 min
    assert (emb.rpm, emb.tpm, emb.minutes, emb.binding_limit) == (4, 0, 0.25, "rpm")
    assert report.slowest is mini and report.models_without_limits == []

    report = estimate_file(path, limits=Limits.parse(tpm=["gpt-4o-mini=5250"]))
    assert report.slowest.model == "gpt-4o-mini" and report.slowest.minutes == 1.0
    assert report.models_without_limits == ["text-embedding-3-small"]
    assert estimate_file(path).slowest is None


def test_jobs_larger_than_the_tpm_limit_are_named_and_left_out_of_the_time(tmp_path):
    # The budget refuses a job whose charge (input + maximum output) exceeds the TPM limit
    # (reserve.lua: request_too_large), so `run` fails it at once: the estimate must say so and
    # not count it in the shortest time.
    rows = [line("c1", {"model": "gpt-4o-mini", "prompt": ids(1000), "max_tokens": 500, "n": 2}, COMPLETIONS),
            line("c2", {"model": "gpt-4o-mini", "prompt": ids(3000), "max_tokens": 250}, COMPLETIONS)]
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    report = estimate_file(path, limits=Limits.parse(tpm=["2625"]))
    (mini,) = report.models
    assert (mini.too_large_jobs, mini.too_large_tokens) == (1, 3250)
    assert mini.too_large == ((2, "c2", 3250),)
    assert mini.minutes == 2000 / 2625  # c1 alone: 1000 input + 2 x 500 output
    data = report.to_dict()["models"][0]
    assert data["too_large_jobs"] == 1 and data["too_large"] == [{"line": 2, "custom_id": "c2", "tokens": 3250}]
    text = render_text(report)
    assert "can never fit   1 job need more than the 2,625 TPM limit at once: c2 (line 2, 3,250 tokens)" in text
    assert "2,000 tokens charged at 2,625 TPM" in text
    # the figure agrees with the budget's own count, job by job
    from batchrun.policy.tokens import estimate_tokens

    assert estimate_tokens(COMPLETIONS, rows[1]["body"]).total == 3250
    # nothing fits: no shortest time is shown
    everything = render_text(estimate_file(path, limits=Limits.parse(tpm=["100"])))
    assert "can never fit   2 jobs" in everything and "shortest time" not in everything


# --- Invalid lines -----------------------------------------------------------------


def test_invalid_lines_are_reported_and_skipped(tmp_path):
    rows = [
        line("ok1", chat("gpt-4o-mini", SYSTEM, QUESTIONS[0], max_tokens=5)),
        "{not json",
        line("ok1", chat("gpt-4o-mini", SYSTEM, QUESTIONS[1], max_tokens=5)),  # duplicate id
        "",  # blank lines are allowed
        {"custom_id": "x", "method": "POST", "url": CHAT, "body": {"messages": []}},  # no model
        line("ok2", chat("gpt-4o-mini", SYSTEM, QUESTIONS[2], max_tokens=5)),
    ]
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    report = estimate_file(path)
    assert report.jobs == 2 and report.invalid_lines == 3
    assert [(e.line_no, e.path) for e in report.errors] == [(2, str(path)), (3, str(path)), (5, str(path))]
    assert "not valid JSON" in report.errors[0].reason
    assert "duplicate custom_id 'ok1' (first on line 1)" in report.errors[1].reason
    assert "no 'model'" in report.errors[2].reason
    valid = [rows[0], rows[5]]
    assert report.input_tokens == sum(estimate_tokens(r["url"], r["body"]).input_tokens for r in valid)
    assert "3 invalid lines skipped" in render_text(report)


def test_only_the_first_errors_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(estimate, "KEPT_ERRORS", 2)
    path = write_jsonl(tmp_path / "jobs.jsonl", ["[]", "[]", "[]", line("a", chat("gpt-4o", "s", "u"))])
    report = estimate_file(path)
    assert report.invalid_lines == 3 and [e.line_no for e in report.errors] == [1, 2] and report.jobs == 1


# --- The command -------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(main, ["estimate", *args], catch_exceptions=False)


JSON_FIELDS = {"file", "jobs", "invalid_lines", "errors", "typical_output_per_answer", "prices", "models", "total", "cache"}
MODEL_FIELDS = {"model", "jobs", "jobs_by_url", "input_tokens", "input_exact", "max_output_tokens",
                "typical_output_tokens", "tokens_charged", "price", "cost_low_usd", "cost_high_usd", "rpm", "tpm",
                "minutes", "binding_limit", "too_large_jobs", "too_large"}
TOTAL_FIELDS = {"jobs", "input_tokens", "max_output_tokens", "typical_output_tokens", "tokens_charged",
                "cost_low_usd", "cost_high_usd", "unpriced_models", "minutes", "binding_model",
                "models_without_limits"}


def test_cli_text(tmp_path):
    path = completions_file(tmp_path)
    prices = tmp_path / "prices.toml"
    prices.write_text('as_of = "2026-01-01"\n[models."gpt-4o-mini"]\ninput = 2.0\ncached_input = 1.0\noutput = 8.0\n')
    res = invoke(str(path), "--prices", str(prices), "--typical-output", "100", "--tpm", "gpt-4o-mini=5250",
                 "--rpm", "4", "--endpoint", COMPLETIONS)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert f"{path}: 2 jobs for 1 model" in out
    assert f"prices: shipped table ({PriceTable.load().as_of}), then {prices} (2026-01-01)" in out
    assert "gpt-4o-mini: 2 jobs (/v1/completions)" in out
    assert "input tokens    4,000 (tiktoken)" in out
    assert "output tokens   at most 1,250; typical 300 (100 per answer)" in out
    # money and durations as `status` writes them (batchrun.text)
    assert "cost            $0.0104 (typical) to $0.0180 (every answer at its maximum)" in out
    # 2 requests at 4 RPM: 0.5 min = 30 s; 5250 tokens at 5250 TPM: 1.0 min (each job fits in 5250)
    assert ("shortest time   1 min 00 s, TPM binds "
            "(2 requests at 4 RPM: 30 s; 5,250 tokens charged at 5,250 TPM: 1 min 00 s)") in out
    assert res.stderr == ""


def test_cli_json(tmp_path):
    path = completions_file(tmp_path)
    with path.open("a") as f:
        f.write("oops\n")
    res = invoke(str(path), "--json", "--tpm", "5250")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert set(data) == JSON_FIELDS
    assert set(data["models"][0]) == MODEL_FIELDS and set(data["total"]) == TOTAL_FIELDS
    assert data["jobs"] == 2 and data["invalid_lines"] == 1
    assert data["errors"] == [{"line": 3, "reason": data["errors"][0]["reason"]}]
    assert "not valid JSON" in data["errors"][0]["reason"]
    m = data["models"][0]
    assert (m["input_tokens"], m["max_output_tokens"], m["tokens_charged"]) == (4000, 1250, 5250)
    assert m["price"] == {"input": 0.15, "cached_input": 0.075, "output": 0.6}  # the shipped gpt-4o-mini
    # shipped gpt-4o-mini: 4000 x 0.15/1M = 0.0006; + 1250 x 0.60/1M = 0.00075 -> 0.00135
    assert m["cost_low_usd"] == pytest.approx(0.0006) and m["cost_high_usd"] == pytest.approx(0.00135)
    assert (m["rpm"], m["tpm"], m["minutes"], m["binding_limit"]) == (None, 5250, 1.0, "tpm")
    assert m["too_large_jobs"] == 0 and m["too_large"] == []
    assert data["total"]["minutes"] == 1.0 and data["total"]["binding_model"] == "gpt-4o-mini"
    assert data["typical_output_per_answer"] is None and data["total"]["typical_output_tokens"] is None


def test_cli_lists_skipped_lines_on_stderr(tmp_path):
    path = write_jsonl(tmp_path / "jobs.jsonl", [line("a", chat("gpt-4o", "s", "u")), "[1]"])
    res = invoke(str(path))
    assert res.exit_code == 0
    assert f"skipped: {path}, line 2: not a JSON object" in res.stderr
    assert "1 invalid line skipped" in res.stdout


def test_cli_user_errors(tmp_path):
    path = completions_file(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."gpt-4o-mini"]\ninput = -1\ncached_input = 0\noutput = 1\n')
    res = invoke(str(path), "--prices", str(bad))
    assert res.exit_code == 1
    assert f"batchrun: price file {bad}, model 'gpt-4o-mini': input must be a finite number >= 0" in res.stderr

    res = invoke(str(path), "--tpm", "lots")
    assert res.exit_code == 2 and "expected a number or MODEL=NUMBER" in res.output

    res = invoke(str(path), "--endpoint", "/v1/nope")
    assert res.exit_code == 1 and "unknown endpoint '/v1/nope'" in res.stderr


def test_cli_prices_from_the_environment(tmp_path, monkeypatch):
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-4o-mini"]\ninput = 2.0\ncached_input = 1.0\noutput = 8.0\n')
    monkeypatch.setenv(ENV_PRICES, str(prices))
    data = json.loads(invoke(str(completions_file(tmp_path)), "--json").stdout)
    assert data["models"][0]["cost_high_usd"] == pytest.approx(0.018)
    assert data["prices"]["sources"][-1] == str(prices)


# --- Speed (opt-in) ----------------------------------------------------------------

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()
SYSTEM_PROMPTS = ["You are a helpful assistant that answers concisely.",
                  "You are an expert data labeller. Reply with one label from the list: positive, negative, "
                  "neutral. Do not explain your choice."]


def write_chat_file(path: Path, lines: int, seed: int = 7) -> Path:
    """A typical chat job file: one of two system prompts, a user prompt of 50-300 words."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(lines):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 300))).capitalize() + "."
            body = chat("gpt-4o-mini", rng.choice(SYSTEM_PROMPTS), text, max_tokens=200)
            f.write(json.dumps(line(f"req-{i}", body)) + "\n")
    return path


@pytest.mark.skipif(not os.environ.get("BATCHRUN_MEASURE_SPEED"), reason="set BATCHRUN_MEASURE_SPEED=1 to measure")
def test_speed(tmp_path):
    load_before = os.getloadavg()[0]  # other work on the machine, before this test adds its own
    path = write_chat_file(tmp_path / "chat100k.jsonl", 100_000)
    size_mb = path.stat().st_size / 1e6
    start = time.perf_counter()
    report = estimate_file(path)
    library = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "batchrun", "estimate", str(path), "--json"], check=True,
                   stdout=subprocess.DEVNULL)
    command = time.perf_counter() - start
    print(f"\n{report.jobs:,} lines ({size_mb:.0f} MB, {report.input_tokens:,} input tokens), "
          f"{os.cpu_count()} cores, load average {load_before:.2f} before the test:\n"
          f"  estimate_file:               {library:.2f} s = {report.jobs / library:,.0f} lines/s\n"
          f"  python -m batchrun estimate: {command:.2f} s = {report.jobs / command:,.0f} lines/s")
    assert report.jobs == 100_000
