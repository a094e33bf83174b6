"""batchrun as a library, called the way users call it: run, complete, arun, astream, stream,
against the mock server; a cap that pauses, resume by batch_id on the real Redis, Ctrl-C."""

from __future__ import annotations

import _thread
import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter

import pytest

import batchrun
from batchrun.api.results import NOT_RUN
from batchrun.files.jobfile import JobFileError
from batchrun.mock.replies import reply_text, request_digest
from tests.helpers import assert_stopped_sending, on


def body(i: int, max_tokens: int = 16) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}],
            "max_tokens": max_tokens}


def sent_digests(server) -> Counter:
    return Counter(entry[1] for entry in server.stats()["log"])


def assert_answers(results, bodies) -> None:
    """Each result is the answer to the request at its place."""
    assert len(results) == len(bodies)
    for result, b in zip(results, bodies):
        assert result.ok, result.error
        assert result.text == reply_text("chat/completions", b), result.custom_id


def test_a_thousand_dicts_come_back_in_input_order(mock):
    bodies = [body(i) for i in range(1000)]
    results = batchrun.run(bodies, **on(mock))
    assert [r.custom_id for r in results] == [str(i) for i in range(1000)]
    assert_answers(results, bodies)
    first = results[0]
    assert first.attempts == 1 and first.usage["completion_tokens"] > 0 and first.cost_usd > 0
    line = first.to_dict()
    assert line["custom_id"] == "0" and line["error"] is None and line["response"]["status_code"] == 200
    assert json.loads(json.dumps(line)) == line  # the Batch API output line, as JSON


def test_batch_api_lines_keep_their_custom_ids_and_a_failure_is_a_value(mock):
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body(i)}
             for i in range(5)]
    results = batchrun.run(lines, **on(mock))
    assert [r.custom_id for r in results] == [f"q{i}" for i in range(5)]
    assert_answers(results, [line["body"] for line in lines])
    mock.set_config(error_rates={"500": 1.0})
    failed = batchrun.run(lines[:2], max_attempts=1, cache=False, **on(mock))  # sent again, not from the cache
    assert [r.ok for r in failed] == [False, False]
    assert failed[0].error.code and failed[0].error.code != NOT_RUN and failed[0].text is None
    assert failed[0].to_dict()["error"]["code"] == failed[0].error.code


def test_run_works_inside_a_running_event_loop(mock):
    bodies = [body(i) for i in range(20)]

    async def cell():  # a notebook cell: the loop is running
        asyncio.get_running_loop()
        return batchrun.run(bodies, **on(mock))

    assert_answers(asyncio.run(cell()), bodies)


def test_arun_and_astream_under_asyncio(mock):
    bodies = [body(i) for i in range(50)]

    async def main():
        ticks = 0

        async def tick():  # the loop stays free while the batch runs
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        ran = await batchrun.arun(bodies, **on(mock))
        streamed = [r async for r in batchrun.astream(bodies, **on(mock))]
        ticker.cancel()
        return ran, streamed, ticks

    ran, streamed, ticks = asyncio.run(main())
    assert_answers(ran, bodies)
    assert sorted(r.custom_id for r in streamed) == sorted(str(i) for i in range(50))
    by_id = {r.custom_id: r for r in streamed}
    assert_answers([by_id[str(i)] for i in range(50)], bodies)
    assert ticks > 5


def test_stream_yields_results_as_they_end(mock):
    mock.set_config(latency_ms=20)
    got = list(batchrun.stream([body(i) for i in range(30)], **on(mock, concurrency=5)))
    assert sorted(int(r.custom_id) for r in got) == list(range(30))
    assert all(r.ok for r in got)


def test_a_cap_that_pauses_returns_what_finished_and_says_why_for_the_rest(mock):
    mock.set_config(latency_ms=50)
    bodies = [body(i, max_tokens=200) for i in range(200)]
    results = batchrun.run(bodies, **on(mock, max_cost=0.001, concurrency=4))
    assert len(results) == 200
    done = [r for r in results if r.ok]
    rest = [r for r in results if not r.ok]
    assert done and rest, "the cap should stop the batch part way"
    assert all(r.error.code == NOT_RUN for r in rest)
    assert "paused" in rest[0].error.message and "max_cost" in rest[0].error.message
    assert_answers([r for r in results if r.ok], [b for b, r in zip(bodies, results) if r.ok])


def test_a_capped_library_run_says_what_to_call_in_python_never_a_command(mock, caplog):
    """Its warnings, the worker lines it logs and its not_run messages name ``max_cost=`` and the
    call to make again; never a `batchrun resume` command nor the temporary file it ran from."""
    mock.set_config(latency_ms=50)
    events = []
    with caplog.at_level(logging.INFO, logger="batchrun"):
        results = batchrun.run([body(i, max_tokens=200) for i in range(200)],
                               **on(mock, max_cost=0.001, concurrency=4, on_event=events.append))
    rest = [r.error.message for r in results if not r.ok]
    assert rest, "the cap should stop the batch part way"
    warnings = [e.text for e in events if e.kind == "warning"]
    assert any("to finish the batch:" in w and "max_cost=" in w for w in warnings), warnings
    said = [e.text for e in events] + rest + [r.getMessage() for r in caplog.records]
    for text in said:
        assert "batchrun resume" not in text and "--max-cost" not in text, text
        assert tempfile.gettempdir() + os.sep not in text, text
    assert "max_cost=" in rest[0]


@pytest.mark.redis
def test_resume_by_batch_id_on_the_real_redis_sends_nothing_twice(mock, real_redis_url):
    mock.set_config(latency_ms=50)
    bodies = [body(i, max_tokens=200) for i in range(120)]
    options = on(mock, redis_url=real_redis_url, batch_id="api-resume", concurrency=4)
    first = batchrun.run(bodies, max_cost=0.001, **options)
    assert any(not r.ok for r in first) and any(r.ok for r in first)
    assert "batch_id='api-resume'" in next(r for r in first if not r.ok).error.message
    second = batchrun.run(bodies, max_cost=1.0, **options)
    assert_answers(second, bodies)
    for r in first:  # what the first call returned comes back the same, not answered again
        if r.ok:
            assert second[int(r.custom_id)].to_dict() == r.to_dict()
    sent = sent_digests(mock)
    assert sorted(sent.values()) == [1] * len(bodies)
    assert set(sent) == {request_digest(b) for b in bodies}


def test_ctrl_c_stops_gracefully_and_a_rerun_onto_the_output_sends_nothing_twice(mock, tmp_path):
    mock.set_config(latency_ms=30)
    bodies = [body(i) for i in range(300)]
    output = str(tmp_path / "out.jsonl")

    def interrupt_once_answers_land():  # not after a fixed time: on a loaded machine, the submit may outlast it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (os.path.exists(output) and os.path.getsize(output)):
            time.sleep(0.02)
        _thread.interrupt_main()

    timer = threading.Thread(target=interrupt_once_answers_land, daemon=True)
    timer.start()
    with pytest.raises(batchrun.Interrupted) as caught:
        batchrun.run(bodies, **on(mock, output=output, concurrency=4))
    timer.join()
    partial = caught.value.results
    assert len(partial) == 300 and 0 < sum(r.ok for r in partial) < 300
    assert f"output={output!r}" in str(caught.value)
    rest = batchrun.run(bodies, **on(mock, output=output, concurrency=50))
    assert_answers(rest, bodies)
    assert sorted(sent_digests(mock).values()) == [1] * len(bodies)


def test_complete_gives_a_hundred_strings(mock):
    texts = batchrun.complete(["Say hi"] * 100, model="gpt-4o-mini", system="Be brief", max_tokens=8,
                              **on(mock))
    assert len(texts) == 100 and all(isinstance(t, str) and t.startswith("mock:") for t in texts)
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Say hi"}]
    assert texts[0] == reply_text("chat/completions", {"model": "gpt-4o-mini", "messages": messages,
                                                       "max_tokens": 8})


def test_bad_requests_are_refused_with_a_sentence(mock):
    with pytest.raises(batchrun.RequestsError, match="request 1 is a str"):
        batchrun.run([body(0), "hello"], **on(mock))
    with pytest.raises(batchrun.ApiKeyMissing, match="OPENAI_API_KEY"):
        batchrun.run([body(0)], base_url=mock.base_url, api_key="", progress=False)


def test_requests_are_checked_before_anything_is_sent_and_no_file_is_written(mock, tmp_path, monkeypatch):
    """Dicts go to the submit as they are (ops/submit.py's submit_requests): an invalid one is
    refused with the job file's sentence naming its index, before any request is sent."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # TMPDIR is read again
    try:
        with pytest.raises(JobFileError, match=r"request 1: .*'model'"):
            batchrun.run([body(0), {"messages": [{"role": "user", "content": "hi"}]}], **on(mock))
        assert mock.stats()["requests"] == 0
        seen = []
        results = batchrun.run([body(i) for i in range(20)],
                               **on(mock, on_event=lambda e: seen.extend(p.name for p in tmp_path.rglob("*"))))
        assert all(r.ok for r in results)
        assert not any(name.endswith("requests.jsonl") for name in seen), seen
    finally:
        tempfile.tempdir = None


def test_the_callers_objects_are_out_of_the_collectors_passes_during_a_run_and_back_after(mock):
    """bench/api_overhead.py: gc.freeze() while a run goes (the caller's 20,000 bodies made each
    full collection of the run a third slower), gc.unfreeze() as it ends."""
    import gc

    counts = []
    batchrun.run([body(i) for i in range(20)], **on(mock, on_event=lambda e: counts.append(gc.get_freeze_count())))
    assert counts and min(counts) > 0
    assert gc.get_freeze_count() == 0


def test_cancelling_arun_stops_its_run(mock):
    mock.set_config(latency_ms=30)

    async def main():
        task = asyncio.ensure_future(batchrun.arun([body(i) for i in range(300)], **on(mock, concurrency=4)))
        deadline = time.monotonic() + 60  # until it sends (on a loaded machine the submit can take seconds)
        while mock.stats()["requests"] < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert_stopped_sending(mock, 300, 0.6)


def test_the_library_refuses_what_the_command_refuses_with_a_sentence(mock):
    from batchrun.settings import OptionsError

    with pytest.raises(OptionsError, match=r"processes=2 needs a shared Redis \(redis_url="):
        batchrun.run([body(0)], **on(mock, processes=2))
    assert mock.stats()["requests"] == 0
