"""Batch states and pause kinds (state/states.py) and the typed batch hash (state/meta.py)."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from batchrun.state import keys
from batchrun.state.meta import BatchMeta, pause_kind_of
from batchrun.state.states import STORED_STATES, BatchState, PauseKind


def _lua(name: str) -> str:
    return resources.files("batchrun.state").joinpath("lua", f"{name}.lua").read_text()


# Scripts that read or write a batch's state (circuit.lua and reserve.lua have a circuit's).
BATCH_SCRIPTS = ("add_jobs", "lease", "complete", "requeue", "reclaim", "set_state", "reserve_cost", "expire_batch")
_STATE_WORDS = [
    re.compile(r"'HSET',\s*\w+,\s*'state',\s*'(\w+)'"),  # HSET b, 'state', 'finished'
    re.compile(r"state or '(\w+)'"),  # lease.lua's answer for a batch without one
    re.compile(r"(?:state|cur|f\[1\]|f\[4\]|f\[5\]|ARGV\[2\]|'state'\))\s*[~=]=\s*'(\w+)'"),  # comparisons
]


def test_every_state_the_lua_scripts_name_is_a_member():
    named = {word for name in BATCH_SCRIPTS for rx in _STATE_WORDS for word in rx.findall(_lua(name))}
    assert {"running", "paused", "finished", "cancelled", "missing"} <= named  # the patterns still find them
    assert named <= {s.value for s in BatchState}


def test_every_pause_kind_the_lua_scripts_write_is_a_member():
    written = set(re.findall(r"'pause_kind',\s*'(\w+)'", _lua("reserve_cost")))
    assert written == {PauseKind.COST_CAP.value}
    assert written <= {k.value for k in PauseKind}


def test_states_read_and_print_as_their_stored_text():
    assert f"{BatchState.PAUSED}" == str(BatchState.PAUSED) == "paused"
    assert f"{BatchState.RUNNING:>9}|" == "  running|"  # the `list` column
    assert json.dumps({"state": BatchState.FINISHED}) == '{"state": "finished"}'
    assert BatchState.RUNNING == "running" and "cancelled" == BatchState.CANCELLED
    assert BatchState.parse(b"paused") is BatchState.PAUSED
    assert BatchState.parse("gone") is None and BatchState.parse(None) is None
    assert PauseKind.parse("cost_cap") is PauseKind.COST_CAP and PauseKind.parse("") is None
    assert BatchState.MISSING not in STORED_STATES and BatchState.FINISHED.ended and not BatchState.PAUSED.ended


def test_batch_meta_reads_a_hash_of_bytes_and_tolerates_garbage():
    meta = BatchMeta.from_hash({b"state": b"running", b"total": b"10", b"done": b"4", b"failed": b"1",
                                b"cost": b"0.25", b"cost_reserved": b"nan", b"shards": b"x", b"source": b"in.jsonl"})
    assert meta.state is BatchState.RUNNING and meta.total == 10 and meta.ended_jobs == 5
    assert meta.cost == 0.25 and meta.cost_reserved == 0.0 and meta.shards == 0
    assert meta.source == "in.jsonl" and meta.fields["total"] == "10" and meta.pause_kind is None
    odd = BatchMeta.from_hash({"state": "exploded"})
    assert odd.state is None and odd.state_text == "exploded"


@pytest.mark.parametrize("fields, kind", [
    ({"state": "paused", "pause_kind": "cost_cap", "reason": "whatever it says"}, PauseKind.COST_CAP),
    ({"state": "paused", "reason": "the next job ... would take the batch past its --max-cost of $1"},
     PauseKind.COST_CAP),  # paused by a version that wrote no kind
    ({"state": "paused", "reason": "no price is known for model 'x'"}, None),
    ({"state": "running", "pause_kind": "cost_cap"}, None),  # only a paused batch has a pause kind
])
def test_pause_kind_of(fields, kind):
    assert pause_kind_of(fields) is kind
    assert BatchMeta.from_hash(fields).pause_kind is kind


def test_a_pause_at_the_cap_writes_its_kind_and_a_resume_clears_it(store, make_batch):
    make_batch(store, "b", 4, max_cost=1.0)
    cids = [j.custom_id for j in store.lease("b", 0, 10, 30_000, "tok").jobs]
    reason, _ = store.reserve_cost("b", "tok|0", [(cid, 0.6) for cid in cids])
    meta = store.batch_meta("b")
    assert meta.state is BatchState.PAUSED and meta.pause_kind is PauseKind.COST_CAP and meta.reason == reason
    assert "cost_cap" == store.redis.hget(keys.batch("b"), "pause_kind").decode()
    store.resume("b")
    meta = store.batch_meta("b")
    assert meta.state is BatchState.RUNNING and meta.pause_kind is None
    assert "pause_kind" not in store.meta("b")
    # Another pause says its own kind (none here), not the last one's.
    store.set_state("b", BatchState.PAUSED, "the account's quota", pause_kind=PauseKind.COST_CAP)
    assert store.batch_meta("b").pause_kind is PauseKind.COST_CAP
    store.set_state("b", BatchState.PAUSED, "the account's quota")
    assert store.batch_meta("b").pause_kind is None


def test_batch_meta_of_the_store(store, make_batch):
    make_batch(store, "b", 3, shard_size=2)
    meta = store.batch_meta("b")
    assert (meta.state, meta.total, meta.shards, meta.done) == (BatchState.RUNNING, 3, 2, 0)
    assert meta.created > 0
    assert store.batch_meta("nope") is None
