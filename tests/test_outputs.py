import json
import multiprocessing
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.files.outputs import (
    JsonlAppender,
    OutcomeIds,
    OutputFileError,
    error_line,
    outcome_ids,
    read_custom_ids,
    repair_truncated_tail,
    result_line,
)


def line(custom_id: str) -> str:
    record = result_line(custom_id, status_code=200, request_id="req_1", body={"ok": True}, line_id=f"batch_req_{custom_id}")
    return json.dumps(record)


# --- read_custom_ids --------------------------------------------------------------------


def test_read_custom_ids(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("a") + "\n\n" + line("b") + "\n")
    assert read_custom_ids(path) == {"a", "b"}


def test_read_custom_ids_of_a_missing_file_is_empty(tmp_path):
    assert read_custom_ids(tmp_path / "nope.jsonl") == set()


def test_read_custom_ids_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("a") + "\n" + line("b")[:30])
    assert read_custom_ids(path) == {"a"}


def test_read_custom_ids_counts_a_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("a") + "\n" + line("b"))
    assert read_custom_ids(path) == {"a", "b"}


def test_read_custom_ids_refuses_a_broken_line_in_the_middle(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("a") + "\n" + line("b")[:30] + "\n" + line("c") + "\n")
    with pytest.raises(OutputFileError, match=re.escape(f"{path}, line 2: not valid JSON")):
        read_custom_ids(path)


def test_read_custom_ids_refuses_lines_without_custom_id(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("a") + "\n" + '{"model": "m"}\n')
    with pytest.raises(OutputFileError, match=re.escape(f"{path}, line 2: not a result line")):
        read_custom_ids(path)


# --- repair_truncated_tail --------------------------------------------------------------


def test_repair_removes_a_truncated_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    good = line("a") + "\n" + line("b") + "\n"
    path.write_text(good + line("c")[:40])
    message = repair_truncated_tail(path)
    assert message == (
        f"{path}: removed a truncated last line left by an interrupted run (40 bytes); "
        "its job will be written again"
    )
    assert path.read_text() == good
    assert repair_truncated_tail(path) is None  # nothing left to do


def test_repair_of_a_file_that_is_one_truncated_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"id": "batch_req_1", "cus')
    assert "(26 bytes)" in repair_truncated_tail(path)
    assert path.read_bytes() == b""


def test_repair_finds_the_line_start_beyond_one_read_chunk(tmp_path):
    path = tmp_path / "results.jsonl"
    long_line = json.dumps(result_line("b", status_code=200, request_id=None, body="x" * 200_000))
    path.write_text(line("a") + "\n" + long_line[:-1])
    assert repair_truncated_tail(path) is not None
    assert path.read_text() == line("a") + "\n"


def test_repair_completes_a_last_line_that_only_lacks_its_newline(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("a") + "\n" + line("b"))
    assert repair_truncated_tail(path) == f"{path}: added the missing newline at the end of the last line"
    assert path.read_text() == line("a") + "\n" + line("b") + "\n"


@pytest.mark.parametrize("content", [None, "", "{}\n"])
def test_repair_leaves_missing_empty_and_complete_files_alone(tmp_path, content):
    path = tmp_path / "results.jsonl"
    if content is not None:
        path.write_text(content)
    assert repair_truncated_tail(path) is None
    assert (path.read_text() if path.exists() else None) == content


# --- JsonlAppender ----------------------------------------------------------------------


def test_appender_writes_whole_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("old") + "\n")
    with JsonlAppender(path) as out:
        out.write({"error": None, "custom_id": "a", "text": "multi\nline caf\u00e9 \ud800"})
        out.write({"error": None, "custom_id": "b"})
        out.flush(fsync=True)
        assert path.read_text().count("\n") == 3  # flushed lines are in the file, each whole
        out.write({"error": None, "custom_id": "c"})
    lines = path.read_text().split("\n")
    assert lines[-1] == ""  # ends with a newline
    assert [json.loads(text)["custom_id"] for text in lines[:-1]] == ["old", "a", "b", "c"]
    assert json.loads(lines[1])["text"] == "multi\nline caf\u00e9 \ud800"


def test_appender_buffers_until_a_chunk_is_full(tmp_path):
    path = tmp_path / "results.jsonl"
    with JsonlAppender(path) as out:
        out.write({"error": None, "custom_id": "a"})
        assert path.read_bytes() == b""  # buffered
        for i in range(2_000):
            out.write({"error": None, "custom_id": f"x-{i}", "pad": "p" * 100})
        data = path.read_bytes()
        assert data and data.endswith(b"\n")  # some chunks written, each of whole lines
    assert len(read_custom_ids(path)) == 2_001


def test_unserialisable_record_leaves_nothing_behind(tmp_path):
    path = tmp_path / "results.jsonl"
    with JsonlAppender(path) as out:
        with pytest.raises(TypeError):
            out.write({"error": None, "custom_id": "a", "bad": object()})
        out.write({"error": None, "custom_id": "b"})
    assert read_custom_ids(path) == {"b"}


def test_second_appender_on_the_same_file_is_refused(tmp_path):
    # flock locks belong to an open file description, so a second open() conflicts even
    # within one process.
    path = tmp_path / "results.jsonl"
    with JsonlAppender(path):
        with pytest.raises(OutputFileError, match=re.escape(f"{path} is being written by another batchrun process (pid")):
            JsonlAppender(path)
        with pytest.raises(OutputFileError):
            JsonlAppender(path, wait=0.2)
    with JsonlAppender(path) as out:  # free again once the first one closed
        out.write({"error": None, "custom_id": "a"})


def hold_lock(path, locked, release):
    with JsonlAppender(path) as out:
        out.write({"error": None, "custom_id": "from-child"})
        out.flush()
        locked.set()
        release.wait(10)


def test_lock_is_held_against_another_process(tmp_path):
    path = str(tmp_path / "results.jsonl")
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=hold_lock, args=(path, locked, release))
    child.start()
    try:
        assert locked.wait(10)
        with pytest.raises(OutputFileError) as info:
            JsonlAppender(path)
        pid = re.search(r"\(pid (\d+)\?\)", str(info.value))
        if pid:  # found through /proc/locks (Linux)
            assert int(pid.group(1)) == child.pid
    finally:
        release.set()
        child.join(10)
    with JsonlAppender(path, wait=5) as out:
        out.write({"error": None, "custom_id": "from-parent"})
    assert read_custom_ids(path) == {"from-child", "from-parent"}


def test_appender_waits_for_the_lock(tmp_path):
    path = str(tmp_path / "results.jsonl")
    ctx = multiprocessing.get_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=hold_lock, args=(path, locked, release))
    child.start()
    try:
        assert locked.wait(10)
        release.set()  # the child lets go shortly; waiting for the lock succeeds
        with JsonlAppender(path, wait=10) as out:
            out.write({"error": None, "custom_id": "after"})
    finally:
        release.set()
        child.join(10)
    assert read_custom_ids(path) == {"from-child", "after"}


def test_resume_pattern_repairs_and_rereads_under_the_lock(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(line("a") + "\n" + line("b")[:25])
    with JsonlAppender(path) as out:
        assert repair_truncated_tail(out.path) is not None
        done = read_custom_ids(out.path)
        for custom_id in ["a", "b", "c"]:
            if custom_id not in done:
                out.write(result_line(custom_id, status_code=200, request_id=None, body={}))
    ids = [json.loads(text)["custom_id"] for text in path.read_text().splitlines()]
    assert ids == ["a", "b", "c"]


def test_write_after_close_is_an_error(tmp_path):
    out = JsonlAppender(tmp_path / "results.jsonl")
    out.close()
    out.close()  # closing twice is harmless
    with pytest.raises(ValueError):
        out.write({"error": None, "custom_id": "a"})


# --- line constructors ------------------------------------------------------------------


def test_result_line_shape():
    body = {"id": "chatcmpl-1", "choices": []}
    got = result_line("req-1", status_code=200, request_id="req_abc", body=body)
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", got.pop("id"))
    assert got == {
        "custom_id": "req-1",
        "response": {"status_code": 200, "request_id": "req_abc", "body": body},
        "error": None,
    }
    assert result_line("r", status_code=200, request_id=None, body=None, line_id="batch_req_x")["id"] == "batch_req_x"
    assert result_line("r", status_code=200, request_id=None, body=None)["id"] != result_line(
        "r", status_code=200, request_id=None, body=None
    )["id"]


def test_error_line_shape_without_response():
    got = error_line("req-2", code="timeout", message="no answer after 3 attempts")
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", got.pop("id"))
    assert got == {
        "custom_id": "req-2",
        "response": None,
        "error": {"code": "timeout", "message": "no answer after 3 attempts"},
    }


def test_error_line_shape_with_response_and_attempts():
    response = {"status_code": 400, "request_id": "req_x", "body": {"error": {"message": "bad"}}}
    attempts = [{"at": "2025-01-01T00:00:00Z", "status_code": 400}]
    got = error_line("req-3", code="invalid_request_error", message="bad", response=response, attempts=attempts)
    assert got["response"] == response
    assert got["error"] == {"code": "invalid_request_error", "message": "bad"}
    assert got["attempts"] == attempts
    assert list(got) == ["id", "custom_id", "response", "error", "attempts"]


def test_line_ids_are_unique_and_shaped_like_upstream():
    from batchrun.files.outputs import _new_line_id, result_line

    ids = {_new_line_id() for _ in range(5000)}
    assert len(ids) == 5000
    for line_id in list(ids)[:50]:
        assert line_id.startswith("batch_req_") and len(line_id) == len("batch_req_") + 32
        int(line_id[len("batch_req_"):], 16)
    assert result_line("a", status_code=200, request_id=None, body={})["id"] not in ids


def test_line_ids_differ_in_a_forked_child(tmp_path):
    import os

    from batchrun.files.outputs import _new_line_id

    _new_line_id()  # the parent's pool is filled
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, _new_line_id().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    assert child != _new_line_id()


def test_write_line_appends_a_serialised_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlAppender(path) as out:
        out.write_line(b'{"custom_id": "a", "error": null}')
        out.write({"custom_id": "b", "error": None})
        with pytest.raises(ValueError):
            out.write_line(b'{"custom_id": "c"}\n')
        with pytest.raises(ValueError):
            out.write_line('{"custom_id": "\u00e9"}'.encode())
    assert read_custom_ids(path) == {"a", "b"}
    assert path.read_bytes() == b'{"custom_id": "a", "error": null}\n{"custom_id": "b", "error": null}\n'


def test_read_custom_ids_refuses_a_jobs_line_naming_file_and_line(tmp_path):
    """A copy of the jobs file given as the output must not pass for finished results."""
    path = tmp_path / "results.jsonl"
    job = {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    path.write_text(line("a") + "\n" + json.dumps(job) + "\n")
    with pytest.raises(OutputFileError, match=re.escape(f"{path}, line 2: not a result line (no response or "
                                                        f"error; it is a job line, with method, url, body)")):
        read_custom_ids(path)


# --- outcome_ids: the ids of a result or error line, however it is spelled -------------------

# Any text, lone surrogates included (json.dumps spells them as escapes; decoded they come back).
_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)
_JSON_SPACE = st.text(" \t\r\n", max_size=3)


@settings(max_examples=300, deadline=None)
@given(custom_id=_ANY_TEXT, line_id=_ANY_TEXT, ascii_only=st.booleans())
def test_outcome_ids_of_the_lines_result_line_and_error_line_make(custom_id, line_id, ascii_only):
    for record in (result_line(custom_id, status_code=200, request_id="req_1", body={"id": "decoy"}, line_id=line_id),
                   error_line(custom_id, code="timeout", message="m", line_id=line_id)):
        try:
            text = json.dumps(record, ensure_ascii=ascii_only)
            raw = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate has no UTF-8: such a line is never stored
            continue
        assert outcome_ids(raw) == OutcomeIds(custom_id, line_id or record["id"])


@settings(max_examples=300, deadline=None)
@given(custom_id=_ANY_TEXT, line_id=_ANY_TEXT, data=st.data())
def test_outcome_ids_take_keys_in_any_order_and_any_whitespace(custom_id, line_id, data):
    # The body holds a line of its own, as result_line spells it, which must not be taken for this one.
    decoy = json.dumps(result_line("decoy", status_code=200, request_id=None, body=None, line_id="decoy"))
    record = {"id": line_id, "custom_id": custom_id, "error": None,
              "response": {"status_code": 200, "request_id": None, "body": {"text": decoy, "line": json.loads(decoy)}}}
    keys = data.draw(st.permutations(list(record)))
    space = [data.draw(_JSON_SPACE) for _ in range(4 * len(keys) + 2)]
    members = [f"{space[4 * i]}{json.dumps(k)}{space[4 * i + 1]}:{space[4 * i + 2]}{json.dumps(record[k])}"
               f"{space[4 * i + 3]}" for i, k in enumerate(keys)]
    raw = (space[-2] + "{" + ",".join(members) + "}" + space[-1]).encode()
    assert outcome_ids(raw) == OutcomeIds(custom_id, line_id)


def test_outcome_ids_of_odd_lines():
    assert outcome_ids(b'{"custom_id": "a", "id": 7}') == OutcomeIds("a", None)
    assert outcome_ids(b'{"custom_id": "a"}') == OutcomeIds("a", None)
    for raw in (b'{"id": "x"}', b'{"custom_id": 3}', b'["custom_id"]', b"not json", b'{"custom_id": "a"'):
        with pytest.raises(ValueError):
            outcome_ids(raw)
