"""`batchrun status`, `list`, `purge` and the progress display: the fields scripts rely on."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from batchrun.state import keys
from batchrun.cli.main import main
from batchrun.ops.progress import Progress
from batchrun.settings import Limits
from batchrun.ops.status import batch_status, describe, format_duration
from tests.conftest import REAL_REDIS_URL

FIELDS = {"batch_id", "state", "reason", "pause_kind", "created_at", "finished_at", "source", "jobs", "last_minute", "totals",
          "models", "endpoints", "eta_seconds", "cost", "cache", "fleet", "share", "remote_batches"}


def test_status_has_the_documented_fields(store, make_batch):
    make_batch(store, "b", 100, shard_size=50, max_cost=2.5)
    st = batch_status(store, "b")
    assert set(st) == FIELDS
    assert st["jobs"] == {"total": 100, "done": 0, "failed": 0, "queued": 100, "in_flight": 0, "waiting_retry": 0}
    assert set(st["last_minute"]) == {"seconds", "requests", "tokens", "rate_limited", "retries", "ended",
                                      "jobs_per_second"}
    assert set(st["totals"]) == {"requests", "tokens", "rate_limited", "retries"}
    assert set(st["cost"]) == {"spent_usd", "in_flight_usd", "unaccounted_usd", "projected_usd", "max_cost_usd",
                               "prices_as_of"}
    assert st["cost"]["max_cost_usd"] == 2.5 and st["cost"]["projected_usd"] is None
    assert st["eta_seconds"] is None  # nothing ended yet: no rate to go by
    assert st["state"] == "running" and st["reason"] is None and st["pause_kind"] is None
    json.dumps(st)  # all of it is JSON


def test_rates_eta_and_projected_cost_come_from_recent_counts(store, make_batch):
    make_batch(store, "b", 100, shard_size=100, limits=Limits.parse(tpm=["gpt-4o-mini=100000"]))
    _age(store, "b", 120)  # per-minute rates are for a batch whose window covers 30 s or more
    cids = [j.custom_id for j in store.lease("b", 0, 40, 30_000, "tok").jobs]
    store.complete("b", [("R", cid, json.dumps({"custom_id": cid}), 0.002) for cid in cids])
    store.add_metrics("b", {"requests": 45, "rate_limited": 5, "retries": 5, "ended": 40, "tokens": 4000,
                            "requests:gpt-4o-mini": 45, "charged:gpt-4o-mini": 9000})
    st = batch_status(store, "b")
    span = st["last_minute"]["seconds"]
    assert st["last_minute"]["ended"] == 40 and st["last_minute"]["rate_limited"] == 5
    assert st["last_minute"]["jobs_per_second"] == pytest.approx(40 / span, rel=0.05)
    # 60 jobs left at 40 per span seconds.
    assert st["eta_seconds"] == pytest.approx(60 / (40 / span), rel=0.05)
    [m] = st["models"]
    assert m["model"] == "gpt-4o-mini" and m["tpm_limit"] == 100000 and m["rpm_limit"] is None
    assert m["tokens_per_minute"] == pytest.approx(9000 * 60 / span, rel=0.05)
    # 40 jobs cost 0.08: the 100 should cost 0.2.
    assert st["cost"]["spent_usd"] == pytest.approx(0.08)
    assert st["cost"]["projected_usd"] == pytest.approx(0.2)
    assert st["totals"] == {"requests": 45, "tokens": 4000, "rate_limited": 5, "retries": 0}
    text = "\n".join(describe(st))
    assert "40 done" in text and "ends in" in text and "of 100,000 TPM" in text and "$0.0800 so far" in text


def _age(store, batch_id: str, seconds: int) -> None:
    store.redis.hset(keys.batch(batch_id), "created", store.server_time_ms() // 1000 - seconds)


def test_a_young_batch_shows_counts_over_its_seconds_not_a_rate_per_minute(store, make_batch):
    # 9,000 tokens in its first second, scaled to a minute, would read "540,000/100,000 TPM"
    make_batch(store, "b", 100, limits=Limits.parse(tpm=["gpt-4o-mini=100000"]))
    store.add_metrics("b", {"requests": 45, "ended": 0, "requests:gpt-4o-mini": 45, "charged:gpt-4o-mini": 9000})
    st = batch_status(store, "b")
    [m] = st["models"]
    assert m["tokens_per_minute"] is None and m["requests_per_minute"] is None
    assert (m["requests"], m["tokens"]) == (45, 9000) and m["seconds"] < 30
    text = "\n".join(describe(st))
    assert "gpt-4o-mini: 45 requests, 9,000 tokens in the first" in text and "TPM" not in text
    out = io.StringIO()
    with Progress(store, "b", total=100, stream=out) as progress:
        progress.update(force=True)
    assert "540,000" not in out.getvalue() and "9,000 tokens in the first" in out.getvalue()
    assert "end time not known yet (no job ended in the last" in out.getvalue()  # not "ETA unknown"


def test_a_cancelled_batch_shows_what_was_not_sent_and_no_projection(store, make_batch):
    make_batch(store, "b", 50)
    cids = [j.custom_id for j in store.lease("b", 0, 10, 30_000, "tok").jobs]
    store.complete("b", [("R", cid, json.dumps({"custom_id": cid}), 0.001) for cid in cids])
    store.set_state("b", "cancelled", "cancelled by the user")
    st = batch_status(store, "b")
    assert st["cost"]["projected_usd"] is None
    text = "\n".join(describe(st))
    assert "40 not sent (cancelled)" in text and "queued" not in text and "whole batch" not in text
    assert "unknown" not in text and "ends in" not in text


def test_tiny_sums_of_money_keep_a_digit_that_is_not_zero():
    from batchrun.ops.status import format_usd

    assert format_usd(0.0000123) == "$0.000012" and format_usd(0.00005) == "$0.000050"
    assert format_usd(0) == "$0.0000" and format_usd(0.0421) == "$0.0421" and format_usd(12.5) == "$12.50"


def test_the_pause_at_the_cap_shows_a_tiny_worst_case_with_a_digit_that_is_not_zero(store, make_batch):
    make_batch(store, "b", 3, max_cost=0.00002)
    cids = [j.custom_id for j in store.lease("b", 0, 3, 30_000, "tok").jobs]
    reason, ok = store.reserve_cost("b", "tok|0", [(cids[0], 0.0000123), (cids[1], 0.0000123)])
    assert ok == [True, False]
    assert f"the next job ({cids[1]}, up to $0.000012) would take the batch past its --max-cost of $0.000020 " \
           "($0.0000 spent, $0.000012 set aside" in reason


def test_status_shows_the_limits_of_the_budgets_the_batch_draws_from(store, make_batch):
    # Another key's budget for the same model has a higher limit: it is not this batch's.
    mine, other = "batchrun:budget:aaaa:fp1:gpt-4o-mini", "batchrun:budget:bbbb:fp2:gpt-4o-mini"
    store.redis.hset(mine, mapping={"lim_rpm": 500, "lim_tpm": 200_000})
    store.redis.hset(other, mapping={"lim_rpm": 10_000, "lim_tpm": 30_000_000})
    store.redis.sadd(keys.BUDGETS, mine, other)
    make_batch(store, "b", 10)
    _age(store, "b", 120)
    store.add_metrics("b", {"requests": 3, "requests:gpt-4o-mini": 3, "charged:gpt-4o-mini": 300, f"via:{mine}": 3})
    [m] = batch_status(store, "b")["models"]
    assert (m["rpm_limit"], m["tpm_limit"]) == (500, 200_000)


def test_a_paused_batch_has_no_eta_and_says_why(store, make_batch):
    make_batch(store, "b", 10)
    store.set_state("b", "paused", "insufficient_quota: add credit, then batchrun resume b")
    st = batch_status(store, "b")
    assert st["state"] == "paused" and st["eta_seconds"] is None
    assert "add credit" in describe(st)[0]
    assert "no end in sight while paused" in "\n".join(describe(st))


def test_durations_read_naturally():
    assert format_duration(None) == "unknown"
    assert format_duration(42.4) == "42 s"
    assert format_duration(125) == "2 min 05 s"
    assert format_duration(3 * 3600 + 60 * 7) == "3 h 07 min"


def test_progress_without_a_terminal_prints_plain_lines(store, make_batch):
    make_batch(store, "b", 20, max_cost=1.0)
    cids = [j.custom_id for j in store.lease("b", 0, 5, 30_000, "tok").jobs]
    store.complete("b", [("R", cid, json.dumps({"custom_id": cid}), 0.01) for cid in cids])
    store.add_metrics("b", {"ended": 5, "requests:gpt-4o-mini": 5, "charged:gpt-4o-mini": 500})
    out = io.StringIO()
    with Progress(store, "b", total=20, stream=out) as progress:
        progress.update(force=True)
    line = out.getvalue().splitlines()[0]
    assert line.startswith("progress: 5/20 jobs ended (5 done, 0 failed); 15 queued, 0 in flight, ")
    assert "ends in " in line and "$0.0500 of $1.0000 cap" in line and "gpt-4o-mini" in line
    assert "\x1b[" not in out.getvalue()  # no terminal codes in logs


@pytest.mark.redis
def test_status_json_list_and_purge_from_the_command_line(real_redis_url, make_batch):
    import redis

    from batchrun.state.store import BatchStore

    store = BatchStore(redis.Redis.from_url(real_redis_url))
    make_batch(store, "cli-b", 10)
    runner = CliRunner()
    res = runner.invoke(main, ["status", "cli-b", "--json", "--redis-url", REAL_REDIS_URL])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert set(data) == FIELDS and data["jobs"]["total"] == 10

    res = runner.invoke(main, ["list", "--redis-url", REAL_REDIS_URL])
    assert res.exit_code == 0 and "cli-b" in res.output and "0/10 done" in res.output

    res = runner.invoke(main, ["purge", "cli-b", "--redis-url", REAL_REDIS_URL], input="n\n")
    assert res.exit_code == 1 and "nothing removed" in res.output and store.exists("cli-b")
    res = runner.invoke(main, ["purge", "cli-b", "--yes", "--redis-url", REAL_REDIS_URL])
    assert res.exit_code == 0 and "purged" in res.output
    assert not store.exists("cli-b") and not store.redis.zscore(keys.BATCHES, "cli-b")
    res = runner.invoke(main, ["status", "cli-b", "--redis-url", REAL_REDIS_URL])
    assert res.exit_code == 1 and "no batch 'cli-b'" in res.output


@pytest.mark.redis
def test_resume_of_a_batch_paused_at_its_cap_needs_a_higher_cap(real_redis_url, make_batch):
    import redis

    from batchrun.state.store import BatchStore

    store = BatchStore(redis.Redis.from_url(real_redis_url))
    make_batch(store, "capped", 10, max_cost=0.5)
    cids = [j.custom_id for j in store.lease("capped", 0, 10, 30_000, "tok").jobs]
    store.complete("capped", [("R", cids[0], json.dumps({"custom_id": cids[0]}), 0.3)])
    reason, ok = store.reserve_cost("capped", "tok|0", [(cids[1], 0.3)])
    assert ok == [False] and store.meta("capped")["state"] == "paused"
    runner = CliRunner()
    url = ["--redis-url", REAL_REDIS_URL]
    res = runner.invoke(main, ["status", "capped", *url])
    assert "paused — the next job" in res.output and "--max-cost" in res.output
    res = runner.invoke(main, ["resume", "capped", *url])
    assert res.exit_code == 1 and "resume it with a higher one: batchrun resume capped --max-cost USD" in res.output
    res = runner.invoke(main, ["resume", "capped", "--max-cost", "0.25", *url])
    assert res.exit_code == 1 and "already spent or set aside $0.3000" in res.output
    assert store.meta("capped")["state"] == "paused"
    res = runner.invoke(main, ["resume", "capped", "--max-cost", "2", *url])
    assert res.exit_code == 0, res.output
    assert "spending cap now $2.0000" in res.output
    meta = store.meta("capped")
    assert meta["state"] == "running" and float(meta["max_cost"]) == 2.0
    assert store.reserve_cost("capped", "tok|0", [(cids[1], 0.3)])[1] == [True]


def test_the_bar_rate_counts_only_jobs_that_ended_while_it_was_shown(store, make_batch):
    # `run … --batch-id ID` continuing a batch: 10 jobs were done before the bar began
    make_batch(store, "b", 20)
    cids = [j.custom_id for j in store.lease("b", 0, 12, 30_000, "tok").jobs]
    store.complete("b", [("R", cid, json.dumps({"custom_id": cid}), 0.0) for cid in cids[:10]])

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with Progress(store, "b", total=20, stream=Terminal()) as progress:
        progress.update(force=True)
        store.complete("b", [("R", cid, json.dumps({"custom_id": cid}), 0.0) for cid in cids[10:]])
        progress.update(force=True)
        shown = progress.bar.format_dict
        assert shown["n"] == 12 and shown["initial"] == 10  # tqdm's rate is (n - initial) / elapsed


@pytest.mark.redis
def test_status_and_limits_read_a_budget_poisoned_with_nan_and_inf(real_redis_url, make_batch):
    """Review finding 3: a budget hash holding nan/inf (written from hostile headers by an older
    version) must not crash `status` or `limits` ("cannot convert float NaN to integer")."""
    import subprocess

    import redis

    from batchrun.state.store import BatchStore
    from tests.helpers import batchrun_cmd, cli_env

    store = BatchStore(redis.Redis.from_url(real_redis_url))
    budget = "batchrun:budget:aaaa:fp1:gpt-4o-mini"
    store.redis.hset(budget, mapping={"lim_rpm": "nan", "lim_tpm": "inf", "req": "-inf", "tok": "nan",
                                      "ts": "1", "cap_t": "inf", "k": "nan"})
    store.redis.sadd(keys.BUDGETS, budget)
    make_batch(store, "poisoned", 3)
    store.add_metrics("poisoned", {"requests": 1, "requests:gpt-4o-mini": 1, f"via:{budget}": 1})
    for args in (("status", "poisoned"), ("status", "poisoned", "--json"), ("limits",)):
        p = subprocess.run(batchrun_cmd(*args, "--redis-url", real_redis_url), env=cli_env(), capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr and "nan" not in p.stdout.lower().replace("nanosecond", ""), p.stdout


def test_a_cooldown_of_hours_is_said_in_hours_not_seconds():
    # A server's per-day 429 cools its budget down for hours: "25919.7 s" is not for reading.
    from batchrun.ops.status import describe_conditions

    said = describe_conditions({"circuits": [], "cooldowns": [{"model": "gpt-4o-mini", "seconds_left": 25_919.7},
                                                             {"model": "gpt-4o", "seconds_left": 1.34}]})
    assert said == "rate limited (gpt-4o-mini): cooling down 7 h 12 min; rate limited (gpt-4o): cooling down 1.3 s"
