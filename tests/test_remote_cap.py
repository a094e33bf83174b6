"""--max-cost with remote batches (--via batch-api, --via auto): each part's worst case at the
Batch API price is set aside before its file goes up, against the one cap live requests draw on;
a part that does not fit is not uploaded and pauses the batch as the live cap does; what comes
back settles to its real cost, so the money spent never passes the cap."""

from __future__ import annotations

import re
import subprocess

import pytest

from batchrun.mock import MockServerThread
from batchrun.ops.resume import set_cap
from batchrun.ops.submit import submit_file
from batchrun.policy.pricing import PriceTable, batch_price, cost_of_usage, worst_case_cost
from batchrun.policy.tokens import estimate_tokens
from batchrun.remote.client import RemoteClient
from batchrun.remote.runner import RemoteRunner
from batchrun.settings import BatchOptions
from batchrun.state.remote_parts import PartState, RemoteParts
from batchrun.state.states import BatchState
from tests.helpers import batchrun_cmd, cli_env, read_lines, write_jobs
from tests import test_remote
from tests.test_remote import mock_summary

pytestmark = pytest.mark.redis
TABLE = PriceTable.load()
real_store = test_remote.real_store  # the fixture, shared


def worst_at_batch_price(path) -> list[float]:
    """Each line's worst case at the Batch API price, in file order (what the cap sets aside)."""
    out = []
    for line in read_lines(path):
        est = estimate_tokens(line["url"], line["body"])
        out.append(worst_case_cost(batch_price(TABLE.price_for(line["body"]["model"])), est.input_tokens,
                                   est.output_tokens))
    return out


def _drive(store, batch_id, srv):
    return RemoteRunner(store, batch_id, RemoteClient(srv.base_url, "sk-test"), max_seconds=30, poll_cap=0.3,
                        max_requests=10).run()


def test_a_cap_that_fits_two_of_three_parts_uploads_two_and_pauses_before_the_third(real_store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 30, max_tokens=40)
    worst = worst_at_batch_price(jobs)
    cap = sum(worst[:20]) + sum(worst[20:]) / 2  # two parts of ten fit, the third does not
    with MockServerThread(batch_seconds=0.3) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", max_cost=cap))
        bid = report.batch_id
        assert _drive(real_store, bid, srv)["again"] is False
        first = mock_summary(srv)
        meta = real_store.meta(bid)
        parts = RemoteParts(real_store.redis).parts(bid)
        assert first["created"] == 2 and sorted(first["batches"].values()) == ["completed"] * 2
        assert [p.state for p in parts] == [PartState.DONE, PartState.DONE, PartState.PLANNED]
        assert not parts[2].file_id and "past its --max-cost" in parts[2].note
        assert (meta["state"], meta["pause_kind"], meta["done"]) == ("paused", "cost_cap", "20")
        assert f"would take the batch past its --max-cost of ${cap:.4f}" in meta["reason"]
        assert "the next remote batch (#2: 10 job(s) of gpt-4o-mini" in meta["reason"]
        assert f"raise the cap with: batchrun resume {bid} --max-cost USD" in meta["reason"]
        assert 0 < float(meta["cost"]) <= cap  # settled to the real cost...
        assert abs(float(meta.get("cost_reserved") or 0)) < 1e-12  # ... and nothing left set aside
        # A higher cap and a resume: the third part goes up, and the batch ends within the new cap.
        set_cap(real_store, bid, cap * 2)
        real_store.resume(bid)
        assert _drive(real_store, bid, srv)["again"] is False
        second = mock_summary(srv)
    meta = real_store.meta(bid)
    assert second["created"] == 3 and (meta["state"], meta["done"]) == ("finished", "30")
    assert float(meta["cost"]) <= cap * 2 and abs(float(meta.get("cost_reserved") or 0)) < 1e-12


def test_a_remote_line_without_usage_counts_its_worst_case(real_store, tmp_path):
    # (a line whose usage cannot be read used to count $0: under a cap that is money unaccounted)
    from batchrun.remote.collect import Recorder
    from batchrun.state.remote_parts import REMOTE_TOKEN

    jobs = write_jobs(tmp_path / "jobs.jsonl", 2, max_tokens=40)
    report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", max_cost=1.0))
    bid = report.batch_id
    real_store.lease(bid, 0, 10, 60_000, REMOTE_TOKEN)
    line = {"custom_id": "req-0", "response": {"status_code": 200, "body": {
        "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]}}}
    Recorder(real_store, bid).record("gpt-4o-mini", ["req-0"], {"req-0": line}, "/v1/chat/completions")
    assert float(real_store.meta(bid)["cost"]) == pytest.approx(worst_at_batch_price(jobs)[0], rel=1e-9)


def test_a_remote_line_answered_by_a_dearer_model_counts_at_its_price(real_store, tmp_path):
    # A live answer is priced by the dearer of the model asked for and the model its body names;
    # a remote line was priced by the model asked for only, so under a cap it counted too little.
    from batchrun.remote.collect import Recorder
    from batchrun.state.remote_parts import REMOTE_TOKEN

    jobs = write_jobs(tmp_path / "jobs.jsonl", 2, max_tokens=40)
    bid = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", max_cost=1.0)).batch_id
    real_store.lease(bid, 0, 10, 60_000, REMOTE_TOKEN)
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}

    def line(cid, model):
        return {"custom_id": cid, "response": {"status_code": 200, "body": {
            "object": "chat.completion", "model": model, "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]}}}

    lines = {"req-0": line("req-0", "gpt-4o"), "req-1": line("req-1", "gpt-4o-mini-2024-07-18")}
    Recorder(real_store, bid).record("gpt-4o-mini", ["req-0", "req-1"], lines, "/v1/chat/completions")
    expected = cost_of_usage(batch_price(TABLE.price_for("gpt-4o")), usage) + \
        cost_of_usage(batch_price(TABLE.price_for("gpt-4o-mini")), usage)
    assert float(real_store.meta(bid)["cost"]) == pytest.approx(expected, rel=1e-9)


def test_run_via_the_batch_api_stops_at_the_cap_and_never_spends_past_it(tmp_path):
    # Three models: three remote batches, made in no set order. The cap holds any two of them
    # (the two dearest included), never all three: two go up, the third is held back.
    parts = [write_jobs(tmp_path / f"{m}.jsonl", 8, max_tokens=60, model=m, prefix=m)
             for m in ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o")]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(p.read_text() for p in parts))
    worst = sorted(sum(worst_at_batch_price(p)) for p in parts)
    cap = worst[1] + worst[2] + worst[0] / 2
    out = tmp_path / "out.jsonl"
    with MockServerThread(batch_seconds=0.3) as srv:
        env = cli_env(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        done = subprocess.run(batchrun_cmd("run", str(jobs), "-o", str(out), "--via", "batch-api",
                                           "--max-cost", repr(cap)), env=env, capture_output=True, text=True,
                              timeout=120)
        summary = mock_summary(srv)
    assert done.returncode == 4, done.stdout + done.stderr  # paused, as at the live cap
    assert re.search(r"is paused: the next remote batch \(#\d: 8 job\(s\) of gpt-[a-z0-9.-]+\) \(up to \$[0-9.]+ "
                     r"at the Batch API price\) would take the batch past its --max-cost of \$", done.stderr), done.stderr
    assert f"batchrun resume {jobs} -o {out} --max-cost USD" in done.stderr
    assert summary["created"] == 2 and sorted(summary["batches"].values()) == ["completed"] * 2
    results = read_lines(out)
    models = [r["response"]["body"]["model"] for r in results]
    assert len(results) == 16 and len(set(models)) == 2 and all(models.count(m) == 8 for m in models)
    spent = sum(cost_of_usage(batch_price(TABLE.price_for(m)), r["response"]["body"]["usage"])
                for m, r in zip(models, results))
    assert 0 < spent <= cap
    assert "16 result(s) written" in done.stdout


def test_jobs_whose_remote_lease_lapsed_while_paused_at_the_cap_are_not_uploaded(real_store, tmp_path):
    # A batch paused at its cap for longer than the remote lease (four days) has its planned part's
    # jobs reclaimed: back in their shard, where live runners take them at the resume. The part's
    # file must then hold only the jobs still leased to it: the others would be sent twice (live and
    # remote) with nothing set aside for their remote copy, and a remote answer landing first would
    # take the live request's reservation away, so that its cost never counted.
    from batchrun.state import keys

    jobs = write_jobs(tmp_path / "jobs.jsonl", 20, max_tokens=40)
    worst = worst_at_batch_price(jobs)
    cap = sum(worst[:10]) + sum(worst[10:]) / 2
    with MockServerThread(batch_seconds=0.3) as srv:
        bid = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", max_cost=cap)).batch_id
        assert _drive(real_store, bid, srv)["again"] is False
        parts = RemoteParts(real_store.redis)
        assert [p.state for p in parts.parts(bid)] == [PartState.DONE, PartState.PLANNED]
        held = parts.ids(bid, 1)
        lapsed = held[:4]
        for cid in lapsed:  # four days later: their remote leases have run out
            real_store.redis.zadd(keys.sub(bid, "leases"), {cid: 1})
        set_cap(real_store, bid, cap * 3)
        real_store.resume(bid)  # reclaims them: back in their shard...
        live = real_store.lease(bid, 0, 100, 60_000, "live-runner")  # ... and a live runner takes them
        assert sorted(j.custom_id for j in live.jobs) == sorted(lapsed)
        assert _drive(real_store, bid, srv)["again"] is False
    last = parts.parts(bid)[1]
    assert last.state is PartState.DONE and last.counts.get("total") == len(held) - len(lapsed)
    assert sorted(parts.ids(bid, 1)) == sorted(held[len(lapsed):])
    owners = real_store.redis.hmget(keys.sub(bid, "owner"), lapsed)
    assert all(o == b"live-runner|0" for o in owners)  # still the live runner's, not ended by the remote part
    assert real_store.redis.hmget(keys.sub(bid, "status"), lapsed) == [None] * len(lapsed)
    meta = real_store.meta(bid)
    assert int(meta["done"]) == 20 - len(lapsed) and abs(float(meta.get("cost_reserved") or 0)) < 1e-12


def test_prices_given_at_the_resume_reach_a_remote_runner_that_kept_going(real_store, tmp_path):
    # Paused for a model without a price while another remote batch is still upstream, the runner
    # goes on polling that one. `resume --prices FILE` then gave the batch the price, but the runner
    # kept the table it started with: it paused the batch again at once, for the same model.
    import threading
    import time

    from batchrun.ops.resume import merged_prices

    priced = write_jobs(tmp_path / "a.jsonl", 5, max_tokens=40, prefix="a")
    unpriced = write_jobs(tmp_path / "b.jsonl", 5, max_tokens=40, model="my-llama", prefix="llama")
    prices = tmp_path / "prices.toml"
    prices.write_text('as_of = "2026-12-01"\n[models."my-llama"]\ninput = 0.1\ncached_input = 0.1\noutput = 0.2\n')
    parts = RemoteParts(real_store.redis)

    def wait_for(what, seconds=15):
        ends = time.monotonic() + seconds
        while not what() and time.monotonic() < ends:
            time.sleep(0.05)
        assert what()

    with MockServerThread(batch_seconds=1.0) as srv:
        bid = submit_file(real_store, str(priced), options=BatchOptions(via="batch-api")).batch_id
        runner = RemoteRunner(real_store, bid, RemoteClient(srv.base_url, "sk-test"), max_seconds=30, poll_cap=0.1)
        done = threading.Thread(target=runner.run)
        done.start()
        try:
            wait_for(lambda: [p.state for p in parts.parts(bid)] == [PartState.RUNNING])
            # Jobs of a model without a price added while the batch is paused, then a cap (as
            # `resume --max-cost` gives it: it checks no price) and the resume.
            real_store.set_state(bid, BatchState.PAUSED, "paused by hand", only_from=(BatchState.RUNNING,))
            submit_file(real_store, str(unpriced), batch_id=bid, options=BatchOptions(via="batch-api"))
            set_cap(real_store, bid, 1.0)
            real_store.resume(bid)
            wait_for(lambda: real_store.meta(bid).get("pause_kind") == "no_price")
            assert parts.parts(bid)[0].state is PartState.RUNNING  # the runner goes on, polling it
            real_store.set_prices(bid, merged_prices(real_store.meta(bid).get("prices"), str(prices)).to_json())
            real_store.resume(bid)
        finally:
            done.join(timeout=40)
        summary = mock_summary(srv)
    meta = real_store.meta(bid)
    assert (meta["state"], meta["done"]) == ("finished", "10"), meta.get("reason")
    assert summary["created"] == 2
    assert float(meta["cost"]) > 0 and abs(float(meta.get("cost_reserved") or 0)) < 1e-12


def test_a_runner_killed_between_the_reservation_and_the_upload_sets_nothing_aside_twice(real_store, tmp_path):
    class Killed(BaseException):
        pass

    jobs = write_jobs(tmp_path / "jobs.jsonl", 10, max_tokens=40)
    worst = sum(worst_at_batch_price(jobs))
    with MockServerThread(batch_seconds=0.3) as srv:
        bid = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", max_cost=worst * 1.5)).batch_id
        client = RemoteClient(srv.base_url, "sk-test")
        upload = client.upload

        def die(*args, **kwargs):
            raise Killed()

        client.upload = die
        with pytest.raises(Killed):
            RemoteRunner(real_store, bid, client, max_seconds=10, poll_cap=0.2).run()
        assert float(real_store.meta(bid)["cost_reserved"]) == pytest.approx(worst, rel=1e-9)
        assert RemoteParts(real_store.redis).parts(bid)[0].reserved
        real_store.redis.delete(f"batchrun:batch:{bid}:rlock")  # its lock lapsed
        client.upload = upload
        # Set aside again, the worst case would be 2 x worst > the cap: the batch would pause.
        assert RemoteRunner(real_store, bid, client, max_seconds=20, poll_cap=0.2).run()["again"] is False
        assert mock_summary(srv)["created"] == 1
    meta = real_store.meta(bid)
    assert (meta["state"], meta["done"]) == ("finished", "10")
    assert 0 < float(meta["cost"]) <= worst and abs(float(meta.get("cost_reserved") or 0)) < 1e-12


def test_status_says_the_amount_set_aside_holds_remote_batches_too(real_store, tmp_path):
    from batchrun.ops.status import batch_status, describe

    jobs = write_jobs(tmp_path / "jobs.jsonl", 10, max_tokens=40)
    worst = sum(worst_at_batch_price(jobs))
    with MockServerThread(batch_seconds=30) as srv:
        bid = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", max_cost=1.0)).batch_id
        RemoteRunner(real_store, bid, RemoteClient(srv.base_url, "sk-test"), max_seconds=0.5, poll_cap=0.1).run()
    text = "\n".join(describe(batch_status(real_store, bid)))
    assert f"cap $1.0000, ${worst:.4f} set aside for requests in flight and remote batches" in text, text


def test_the_command_printed_at_the_cap_names_the_config_file_given(real_store, real_redis_url, tmp_path):
    # `batchrun --config FILE run …` paused at its cap printed `batchrun run … --max-cost USD`
    # without the file: pasted, it ran without its [[endpoints]], and the remote batch bound for one
    # of them was retried for --give-up-after, then paused again (or it asked for OPENAI_API_KEY).
    # Every printed command goes through hints.command: seen here through `resume` at the cap.
    from batchrun.ops import hints
    from batchrun.state.states import PauseKind

    jobs = write_jobs(tmp_path / "jobs.jsonl", 2, max_tokens=40)
    bid = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api", max_cost=1.0)).batch_id
    real_store.set_state(bid, BatchState.PAUSED, "at the cap", only_from=(BatchState.RUNNING,),
                         pause_kind=PauseKind.COST_CAP)
    config = tmp_path / "batchrun.toml"
    config.write_text('[[endpoints]]\nname = "bapi"\nbase_url = "http://127.0.0.1:9/v1"\nvia = "batch-api"\n')
    done = subprocess.run(batchrun_cmd("--config", str(config), "resume", bid, "--redis-url", real_redis_url),
                          env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"resume it with a higher one: batchrun --config {config} resume {bid} --max-cost USD" in done.stderr, \
        done.stderr
    assert hints.command(["status", bid]) == f"batchrun status {bid}"  # (this process was given no --config)
