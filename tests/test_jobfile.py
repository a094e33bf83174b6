import json
import tracemalloc
from pathlib import Path

import pytest

from batchrun.files.jobfile import (
    URLS,
    Job,
    JobFileError,
    LineError,
    iter_jobs,
    read_jobs,
    validate_file,
)
from batchrun.files.seen_ids import SeenIds

ROOT = Path(__file__).resolve().parent.parent


def batch_line(custom_id="req-1", **overrides):
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    line.update(overrides)
    return json.dumps(line)


def write(tmp_path, *lines, name="jobs.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def only_error(path, **kwargs) -> LineError:
    errors = [item for item in iter_jobs(path, **kwargs) if isinstance(item, LineError)]
    assert len(errors) == 1, errors
    return errors[0]


# --- valid lines -------------------------------------------------------------------------


def test_batch_api_line(tmp_path):
    path = write(tmp_path, batch_line("req-1"), batch_line("req-2", url="/v1/responses"))
    jobs = list(iter_jobs(path))
    assert jobs[0] == Job("req-1", "POST", "/v1/chat/completions", json.loads(batch_line())["body"], 1)
    assert jobs[1].url == "/v1/responses" and jobs[1].line_no == 2


def test_bare_body_with_metadata_custom_id(tmp_path):
    body = {"model": "gpt-4o-mini", "messages": [], "metadata": {"custom_id": "x", "row": 7}}
    path = write(tmp_path, json.dumps(body), json.dumps({"model": "m", "metadata": {"custom_id": 42}}))
    first, second = iter_jobs(path, endpoint="/v1/chat/completions")
    assert first.custom_id == "x" and first.url == "/v1/chat/completions" and first.method == "POST"
    assert first.body == {"model": "gpt-4o-mini", "messages": []}  # metadata is not sent
    assert second.custom_id == "42"  # numbers are accepted, as strings


def test_bare_body_without_custom_id_is_named_after_its_line(tmp_path):
    path = write(tmp_path, "", json.dumps({"model": "text-embedding-3-small", "input": "hello"}))
    (job,) = iter_jobs(path, endpoint="/v1/embeddings")
    assert job.custom_id == "line-2" and job.url == "/v1/embeddings" and job.line_no == 2


def test_blank_lines_are_skipped_not_errors(tmp_path):
    path = write(tmp_path, "", batch_line("a"), "   ", "\t\r", batch_line("b"), "")
    assert [job.line_no for job in iter_jobs(path)] == [2, 5]
    assert validate_file(path) == (2, [])


def test_crlf_line_endings_and_byte_order_mark(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + batch_line("a").encode() + b"\r\n" + batch_line("b").encode() + b"\r\n")
    assert [job.custom_id for job in iter_jobs(path)] == ["a", "b"]


def test_unknown_endpoint_is_refused_at_the_call(tmp_path):
    path = write(tmp_path, batch_line())
    with pytest.raises(ValueError, match="unknown endpoint '/v1/chat'"):
        iter_jobs(path, endpoint="/v1/chat")
    with pytest.raises(ValueError):
        read_jobs(path, endpoint="/v1/chat")
    with pytest.raises(ValueError):
        validate_file(path, endpoint="/v1/chat")


# --- each kind of invalid line: file, line number and reason ----------------------------


def assert_error(error, path, line_no, *fragments):
    text = str(error)
    assert text.startswith(f"{path}, line {line_no}: "), text
    for fragment in fragments:
        assert fragment in text, text


def test_invalid_json(tmp_path):
    path = write(tmp_path, batch_line("a"), '{"custom_id": "b" "method": "POST"}')
    assert_error(only_error(path), path, 2, "not valid JSON: Expecting ',' delimiter at column 19")


def test_line_is_not_an_object(tmp_path):
    path = write(tmp_path, "[1, 2]")
    assert_error(only_error(path), path, 1, "not a JSON object (it is an array)")


@pytest.mark.parametrize("field", ["custom_id", "method", "url", "body"])
def test_missing_field(tmp_path, field):
    line = json.loads(batch_line())
    del line[field]
    path = write(tmp_path, batch_line("other"), json.dumps(line))
    assert_error(only_error(path), path, 2, f"missing field '{field}'")


def test_several_missing_fields_are_named_together(tmp_path):
    path = write(tmp_path, json.dumps({"custom_id": "a", "body": {"model": "m"}}))
    assert_error(only_error(path), path, 1, "missing fields 'method' and 'url'")


def test_object_of_neither_format(tmp_path):
    path = write(tmp_path, json.dumps({"messages": []}))
    assert_error(only_error(path), path, 1, "neither a Batch API line", "no 'model'")


def test_custom_id_must_be_a_non_empty_string(tmp_path):
    path = write(tmp_path, batch_line(""), batch_line(7))
    errors = [e for e in iter_jobs(path) if isinstance(e, LineError)]
    assert_error(errors[0], path, 1, "custom_id must be a non-empty string, not an empty string")
    assert_error(errors[1], path, 2, "custom_id must be a non-empty string, not a number")


def test_method_must_be_post(tmp_path):
    path = write(tmp_path, batch_line(method="GET"))
    assert_error(only_error(path), path, 1, "method must be \"POST\", not 'GET'")


def test_unknown_url(tmp_path):
    path = write(tmp_path, batch_line(url="/v1/foo"))
    assert_error(only_error(path), path, 1, "unknown url '/v1/foo' (expected one of " + ", ".join(URLS) + ")")


def test_duplicate_custom_id_names_both_lines(tmp_path):
    path = write(tmp_path, batch_line("req-1"), batch_line("req-3"), batch_line("req-2"), batch_line("req-3"))
    assert_error(only_error(path), path, 4, "duplicate custom_id 'req-3' (first on line 2)")


def test_duplicate_across_formats(tmp_path):
    bare = json.dumps({"model": "m", "metadata": {"custom_id": "req-1"}})
    path = write(tmp_path, batch_line("req-1"), bare, json.dumps({"model": "m"}), batch_line("line-3"))
    errors = [e for e in iter_jobs(path) if isinstance(e, LineError)]
    assert [str(e) for e in errors] == [
        f"{path}, line 2: duplicate custom_id 'req-1' (first on line 1)",
        f"{path}, line 4: duplicate custom_id 'line-3' (first on line 3)",
    ]


def test_body_is_not_an_object(tmp_path):
    path = write(tmp_path, batch_line(body="hello"))
    assert_error(only_error(path), path, 1, "body is not an object (it is a string)")


def test_body_has_no_model(tmp_path):
    path = write(tmp_path, batch_line(body={"messages": []}))
    assert_error(only_error(path), path, 1, "body has no 'model'")


def test_invalid_utf8(tmp_path):
    path = write(tmp_path, batch_line("a"), b'{"model": "m", "input": "caf\xe9"}')
    assert_error(only_error(path), path, 2, "not valid UTF-8 (byte 0xe9 at byte 29 of the line)")


def test_bad_metadata_custom_id(tmp_path):
    path = write(tmp_path, json.dumps({"model": "m", "metadata": {"custom_id": ["x"]}}))
    assert_error(only_error(path), path, 1, "metadata.custom_id must be a non-empty string or a number")


# --- validate_file, read_jobs, JobFileError ---------------------------------------------


def mixed_file(tmp_path) -> Path:
    return write(tmp_path, batch_line("a"), "not json", batch_line("b"), "[]", "", batch_line("a"))


def test_validate_file_counts_valid_jobs_and_collects_errors(tmp_path):
    path = mixed_file(tmp_path)
    valid, errors = validate_file(path)
    assert valid == 2
    assert [e.line_no for e in errors] == [2, 4, 6]


def test_job_file_error_message(tmp_path):
    path = mixed_file(tmp_path)
    _, errors = validate_file(path)
    message = str(JobFileError(errors))
    assert message.startswith(
        f"{path} has 3 invalid lines; nothing was submitted (use --skip-invalid to submit the valid ones):\n"
        f"  {path}, line 2: not valid JSON"
    )
    assert message.endswith(f"  {path}, line 6: duplicate custom_id 'a' (first on line 1)")


def test_job_file_error_lists_twenty_and_counts_the_rest(tmp_path):
    errors = [LineError("jobs.jsonl", n, "not valid JSON") for n in range(1, 26)]
    lines = str(JobFileError(errors)).splitlines()
    assert lines[0].startswith("jobs.jsonl has 25 invalid lines")
    assert lines[1:21] == [f"  jobs.jsonl, line {n}: not valid JSON" for n in range(1, 21)]
    assert lines[21:] == ["  ... and 5 more"]
    assert str(JobFileError(errors[:1])).startswith("jobs.jsonl has 1 invalid line;")


def test_read_jobs_raises_at_an_invalid_line(tmp_path):
    path = mixed_file(tmp_path)
    jobs = read_jobs(path)
    assert next(jobs).custom_id == "a"
    with pytest.raises(JobFileError) as info:
        next(jobs)
    assert [e.line_no for e in info.value.errors] == [2]


def test_read_jobs_skip_invalid_reports_each_skipped_line(tmp_path):
    path = mixed_file(tmp_path)
    skipped = []
    jobs = list(read_jobs(path, skip_invalid=True, on_skip=skipped.append))
    assert [job.custom_id for job in jobs] == ["a", "b"]
    assert [e.line_no for e in skipped] == [2, 4, 6]
    assert len(list(read_jobs(path, skip_invalid=True))) == 2


def test_example_job_file_is_valid():
    valid, errors = validate_file(ROOT / "jobs.example.jsonl")
    assert errors == []
    assert valid >= 12


# --- streaming --------------------------------------------------------------------------


def test_lines_appended_after_the_first_job_is_read_are_seen(tmp_path):
    # The generator cannot have read the whole file up front: the rest did not exist yet.
    path = write(tmp_path, batch_line("a"))
    jobs = iter_jobs(path)
    assert next(jobs).custom_id == "a"
    with open(path, "a") as f:
        f.write(batch_line("b") + "\n")
    assert next(jobs).custom_id == "b"
    assert next(jobs, None) is None


def test_memory_stays_small_on_a_large_file(tmp_path):
    padding = "x" * 2000
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(10_000):
            f.write(batch_line(f"req-{i}", body={"model": "m", "input": padding}) + "\n")
    size = path.stat().st_size
    assert size > 20_000_000

    tracemalloc.start()
    try:
        valid, errors = validate_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (valid, errors) == (10_000, [])
    assert peak < 2_000_000, f"peak {peak} bytes for a {size}-byte file"


def test_seen_ids_keeps_first_lines_across_growth():
    seen = SeenIds(capacity=4)
    for i in range(5_000):
        assert seen.add(f"id-{i}", i + 1) is None
    assert len(seen) == 5_000
    assert seen.add("id-0", 9_999) == 1
    assert seen.add("id-4999", 9_999) == 5_000
    assert seen.add("a" * 10_000, 6) is None  # long ids cost no more
    assert seen.add("\ud800", 7) is None  # a lone surrogate, which JSON can spell
    assert seen.add("\ud800", 8) == 7


# --- iter_requests (submit's trusted second pass) ------------------------------------------------


def test_iter_requests_gives_what_read_jobs_gives(tmp_path):
    from batchrun.files.jobfile import iter_requests

    path = tmp_path / "jobs.jsonl"
    lines = [
        '\ufeff{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}',
        "",
        '{"model": "m", "messages": [], "metadata": {"custom_id": 7}}',
        '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}',  # duplicate
        '{"model": "m", "prompt": "p"}\r',
        "   ",
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode())
    valid, errors = validate_file(path, endpoint="/v1/completions")
    assert valid == 3 and [e.line_no for e in errors] == [4]
    expected = [(j.custom_id, j.url, j.body) for j in read_jobs(path, endpoint="/v1/completions", skip_invalid=True)]
    got = []
    for cid, request in iter_requests(path, endpoint="/v1/completions", skip_lines=[e.line_no for e in errors]):
        assert isinstance(request, bytes)
        req = json.loads(request)
        got.append((cid, req["url"], req["body"]))
    assert got == expected
    assert got[1] == ("7", "/v1/completions", {"model": "m", "messages": []})  # metadata removed
    assert got[2][0] == "line-5"


def test_iter_requests_notices_a_file_changed_since_validation(tmp_path):
    from batchrun.files.jobfile import iter_requests

    path = tmp_path / "jobs.jsonl"
    path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n')
    assert validate_file(path) == (1, [])
    path.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": \n')
    with pytest.raises(JobFileError, match="changed"):
        list(iter_requests(path))


def test_only_json_whitespace_may_follow_a_line_and_lines_appended_later_are_not_taken(tmp_path):
    from batchrun.files.jobfile import iter_requests, validate_file

    path = tmp_path / "jobs.jsonl"
    good = '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}'
    path.write_text(good + "\n" + good.replace('"a"', '"b"') + "\u00a0\n", encoding="utf-8")
    valid, errors = validate_file(path)
    assert valid == 1 and [e.line_no for e in errors] == [2] and "not valid JSON" in errors[0].reason
    size = path.stat().st_size
    with open(path, "a") as f:  # appended after validation
        f.write(good.replace('"a"', '"c"') + "\n")
    assert [cid for cid, _ in iter_requests(path, skip_lines=[2], size=size)] == ["a"]


# --- what the loading pass or Redis could not take ---------------------------------------------

@pytest.mark.parametrize("line, reason", [
    (r'{"custom_id": "req-\ud800", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}',
     r"custom_id holds a lone UTF-16 surrogate (\ud800), which is not valid Unicode"),
    (r'{"model": "m", "metadata": {"custom_id": "x\uDFFFy"}}',
     r"custom_id holds a lone UTF-16 surrogate (\udfff)"),
    (r'{"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", '
     r'"body": {"model": "m", "messages": [{"role": "user", "content": "hi \udc80"}]}}',
     r"a string in the line holds a lone UTF-16 surrogate (\udc80), which is not valid Unicode and cannot be sent"),
    ('{"model": "m", "seed": ' + "9" * 5000 + "}", "holds a number of more than 4,300 digits"),
    ('{"model": "m", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply to be read"),
])
def test_lines_that_redis_or_the_request_could_not_carry_are_invalid(tmp_path, line, reason):
    path = write(tmp_path, batch_line("ok-1"), line, batch_line("ok-2"))
    valid, errors = validate_file(path)
    assert valid == 2 and [(e.line_no, e.reason[:len(reason)]) for e in errors] == [(2, reason)]


def test_surrogate_pairs_and_nul_characters_are_valid(tmp_path):
    pair = batch_line("req-\ud83d\ude00")  # json.dumps spells the emoji as a surrogate pair: one character
    assert r"\ud83d\ude00" in pair
    nul = batch_line("req-\u0000", body={"model": "m", "messages": [{"role": "user", "content": "a\u0000b"}]})
    assert validate_file(write(tmp_path, pair, nul)) == (2, [])


def test_a_line_longer_than_a_job_can_hold_is_invalid(tmp_path, monkeypatch):
    import batchrun.files.jobfile as jobfile

    monkeypatch.setattr(jobfile, "MAX_LINE_BYTES", 1 << 20, raising=False)
    big = batch_line("big", body={"model": "m", "messages": [{"role": "user", "content": "x" * (1 << 20)}]})
    valid, errors = validate_file(write(tmp_path, batch_line("ok"), big))
    assert valid == 1 and [(e.line_no, e.reason) for e in errors] == [(2, "longer than 1 MB, more than a job can hold")]
