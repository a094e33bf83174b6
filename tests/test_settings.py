"""Settings: per-model limits as the CLI gives them, and batch options stored in Redis."""

import pytest

from batchrun.settings import BatchOptions, Limits


def test_a_bare_limit_applies_to_every_model_and_merges_with_per_model_ones():
    limits = Limits.parse(rpm=["gpt-4o=500"], tpm=["2000000"])
    assert limits.for_model("gpt-4o") == (500, 2_000_000)
    assert limits.for_model("gpt-4o-mini") == (0, 2_000_000)
    assert Limits.parse(tpm=["gpt-4o=10", "20"]).for_model("gpt-4o") == (0, 10)  # the model's own wins


@pytest.mark.parametrize("spec", ["lots", "gpt-4o=", "=-5", "-1"])
def test_bad_limits_are_refused_with_the_value(spec):
    with pytest.raises(ValueError, match="--tpm"):
        Limits.parse(tpm=[spec])


def test_batch_options_round_trip_through_redis_fields():
    opts = BatchOptions(max_attempts=3, backoff_base=0.5, burst_seconds=1, limits=Limits.parse(tpm=["m=7"]))
    assert BatchOptions.from_fields(opts.to_fields()) == opts


def test_auto_shard_size_gives_small_files_four_shards_and_big_ones_big_shards():
    from batchrun.settings import auto_shard_size

    assert auto_shard_size(0) == 1000 and auto_shard_size(3000) == 1000  # 3 shards of 1,000
    assert auto_shard_size(8000) == 2000  # 4 shards
    assert auto_shard_size(20_001) == 5001  # 4 shards, the last a little smaller
    assert auto_shard_size(1_000_000) == 10_000  # 100 shards


# --- Options that cannot work (issue 11 item 6) --------------------------------------------

import math  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from batchrun.settings import WorkerSettings, check_batch_options  # noqa: E402


@pytest.mark.parametrize("spec, words", [
    ("0", "leave --tpm out for no limit"), ("=100", "model name before '=' is missing"),
    ("gpt-4o=1e400", "whole number"), ("nan", "whole number"), ("2.5", "whole number"),
])
def test_limits_that_cannot_mean_what_was_typed_are_refused(spec, words):
    with pytest.raises(ValueError, match="--tpm") as exc:
        Limits.parse(tpm=[spec])
    assert words in str(exc.value)


def test_underscores_and_exponents_still_read_as_limits():
    assert Limits.parse(tpm=["gpt-4o-mini=2_000_000", "2e6"]).by_model == {"gpt-4o-mini": {"tpm": 2_000_000},
                                                                          "*": {"tpm": 2_000_000}}
    assert Limits.parse(tpm=["m=5", "7"]).models() == {"m"}


@given(st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_any_limit_string_gives_a_limit_or_a_sentence(spec):
    try:
        limits = Limits.parse(rpm=[spec])
    except ValueError as exc:
        assert str(exc).startswith(f"--rpm {spec!r}: ")
    else:
        [(model, entry)] = limits.by_model.items()
        assert model and isinstance(entry["rpm"], int) and entry["rpm"] >= 1


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**12), st.booleans(),
                    st.text(max_size=5), st.none())


@given(max_attempts=numbers, backoff_base=numbers, backoff_factor=numbers, backoff_cap=numbers, shard_size=numbers,
       burst_seconds=numbers, max_cost=numbers, keep_days=numbers)
@settings(max_examples=400, deadline=None)
def test_options_the_check_accepts_make_a_working_policy_and_the_rest_name_their_option(**values):
    from batchrun.policy.backoff import BackoffPolicy

    options = BatchOptions(**values)
    problems = check_batch_options(options)
    assert all(isinstance(p, str) for p in problems)
    names = {"max_attempts": "--max-attempts", "backoff_base": "--backoff-base", "backoff_factor": "backoff factor",
             "backoff_cap": "--backoff-cap", "shard_size": "--shard-size", "burst_seconds": "--burst-seconds",
             "max_cost": "--max-cost", "keep_days": "--keep-days"}
    for field, option in names.items():
        if any(p.startswith(option + " ") for p in problems):
            continue
        assert isinstance(values[field], (int, float)) and math.isfinite(values[field]), field
    if not problems:
        # the runner builds its policy and its keys' expiry from them: neither may fail
        BackoffPolicy(base=options.backoff_base, factor=options.backoff_factor, cap=options.backoff_cap,
                      max_attempts=options.max_attempts)
        assert 0 < options.keep_days * 86400 < 2**31 * 10
        assert BatchOptions.from_fields(options.to_fields()).problems() == []


def test_worker_settings_from_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv("BATCHRUN_LEASE_SECONDS", "abc")
    with pytest.raises(ValueError, match="BATCHRUN_LEASE_SECONDS='abc' is not a number"):
        WorkerSettings.from_env()
    monkeypatch.setenv("BATCHRUN_LEASE_SECONDS", "0.5")
    with pytest.raises(ValueError, match="BATCHRUN_LEASE_SECONDS must be a number of seconds from 3"):
        WorkerSettings.from_env()
    monkeypatch.setenv("BATCHRUN_LEASE_SECONDS", "10")
    assert WorkerSettings.from_env(concurrency=5).lease_seconds == 10
    with pytest.raises(ValueError, match="--grace"):
        WorkerSettings.from_env(grace_seconds=float("nan"))


@pytest.mark.parametrize("field, value, option", [("backoff_cap", "0.0", "--backoff-cap"),
                                                  ("max_attempts", "0", "--max-attempts"),
                                                  ("keep_days", "inf", "--keep-days"),
                                                  ("backoff_base", "lots", "do not read as options")])
def test_a_runner_pauses_a_batch_whose_stored_options_cannot_work_instead_of_crashing(store, make_batch, field,
                                                                                      value, option, caplog):
    import asyncio
    import logging

    from batchrun.state import keys
    from batchrun.runner.shard import ShardRunner

    make_batch(store, "b", 5)
    store.redis.hset(keys.batch("b"), field, value)  # as an older batchrun (or a hand) stored it
    runner = ShardRunner(store, "b", 0, WorkerSettings(base_url="http://127.0.0.1:9/v1", api_key="sk-x"))
    with caplog.at_level(logging.ERROR, logger="batchrun"):
        assert asyncio.run(runner.run()) == {}
    meta = store.meta("b")
    assert meta["state"] == "paused" and option in meta["reason"] and "batchrun purge b" in meta["reason"]
    assert store.redis.zscore(keys.PARKED, "b:0") is None  # nothing brings the shard back by itself
    assert [r.getMessage() for r in caplog.records].count(f"batch b paused: {meta['reason']}") == 1
    from batchrun.ops.status import batch_status

    assert batch_status(store, "b")["reason"] == meta["reason"]  # status shows it, whatever was stored
    # a second runner (a resume) pauses it again without a second log line or a crash
    assert asyncio.run(ShardRunner(store, "b", 0, WorkerSettings(base_url="http://127.0.0.1:9/v1",
                                                                 api_key="sk-x")).run()) == {}


def test_shard_size_and_concurrency_have_ceilings():
    from batchrun.settings import MAX_CONCURRENCY, MAX_SHARD_SIZE

    assert check_batch_options(BatchOptions(shard_size=MAX_SHARD_SIZE)) == []
    assert [p for p in check_batch_options(BatchOptions(shard_size=MAX_SHARD_SIZE + 1)) if "--shard-size" in p]
    assert WorkerSettings(concurrency=MAX_CONCURRENCY).problems() == []
    assert [p for p in WorkerSettings(concurrency=MAX_CONCURRENCY + 1).problems() if "--concurrency" in p]
