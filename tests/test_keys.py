"""Key names (state/keys.py): the strings a live Redis holds, built and parsed in one place."""

from __future__ import annotations

import re
from importlib import resources

from batchrun.state import keys, scripts


def _lua(name: str) -> str:
    return resources.files("batchrun.state").joinpath("lua", f"{name}.lua").read_text()


def test_key_strings_stay_what_live_data_has():
    assert keys.batch("b1") == "batchrun:batch:b1"
    assert keys.sub("b1", "owner") == "batchrun:batch:b1:owner"
    assert keys.todo("b1", 3) == "batchrun:batch:b1:todo:3" == keys.todo_prefix("b1") + "3"
    assert keys.metrics_bucket("b1", 42) == "batchrun:batch:b1:m:42" == keys.metrics_prefix("b1") + "42"
    assert keys.batch_pattern("b1") == "batchrun:batch:b1:*"
    assert keys.budget("e:f:m") == "batchrun:budget:e:f:m"
    assert keys.held("batchrun:budget:e:f:m") == "batchrun:budget:e:f:m:held"
    assert keys.circuit("e") == "batchrun:circuit:e"
    assert keys.parked_member("b1", 7) == "b1:7" == keys.parked_prefix("b1") + "7"
    assert (keys.BATCHES, keys.ACTIVE, keys.PARKED, keys.BUDGETS, keys.ENDED) == (
        "batchrun:batches", "batchrun:active", "batchrun:parked", "batchrun:budgets", "batchrun:ended")


def test_budget_ids_hash_the_endpoint_and_keep_the_model_whole():
    # sha256 of the URL without its trailing slash, as budgets in a live Redis are named
    assert keys.endpoint_id("http://h/v1/") == keys.endpoint_id("http://h/v1") == "b167cca4f2"
    bid = keys.budget_id("http://h/v1", "fp", "ft:gpt-4o:org:x")
    assert bid == "b167cca4f2:fp:ft:gpt-4o:org:x"
    name = keys.split_budget(keys.budget(bid))
    assert name == keys.BudgetName("b167cca4f2", "fp", "ft:gpt-4o:org:x") and name.model == "ft:gpt-4o:org:x"


def test_parked_members_split_back():
    member = keys.parked_member("batch.2026-01", 12)
    assert keys.split_parked_member(member) == keys.ParkedShard("batch.2026-01", 12)
    assert keys.split_parked_member(member).shard == 12


def test_scripts_take_their_keys_through_KEYS():
    deriving = {name for name in scripts.NAMES if re.search(r"\.\.\s*':", _lua(name))}
    assert not deriving


def test_the_shard_of_a_lease_owner():
    assert keys.owner_shard("runner-a|12") == 12 and keys.owner_shard("a|b|3") == 3
    assert keys.owner_shard("") is None and keys.owner_shard("runner-a") is None and keys.owner_shard("x|") is None


def test_one_prelude_reads_the_server_clock():
    prelude = _lua(scripts.PRELUDE)
    assert "redis.call('TIME')" in prelude
    for name in scripts.NAMES:
        assert "'TIME'" not in _lua(name), name  # each script uses the prelude's now_ms()/server_time()
        assert scripts.source(name).startswith(prelude)


def test_every_script_loads_and_runs_with_its_prelude(store):
    # A script that uses a helper the prelude lacks fails when it runs; park and promote are cheap.
    store.park("b", 0, None)
    assert store.redis.zscore(keys.PARKED, "b:0") is not None
    assert store.promote_parked(limit=0) == 0
    for name in scripts.NAMES:
        store.redis.script_load(scripts.source(name))  # compiles: no syntax error from the join
