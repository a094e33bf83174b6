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
