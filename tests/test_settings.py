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
