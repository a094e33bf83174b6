"""batchrun.ops.resume: the rules a batch's new spending cap and new price file follow, for
`resume BATCH_ID` and `run --batch-id` alike (issue 14)."""

from __future__ import annotations

import json

import pytest

from batchrun.ops.resume import CapTooLow, merged_prices, paused_at_cap, set_cap
from batchrun.policy.pricing import ENV_PRICES, Price, PriceTable


@pytest.fixture(autouse=True)
def no_user_prices(monkeypatch):
    monkeypatch.delenv(ENV_PRICES, raising=False)  # "shipped" must mean the shipped table


# --- the cap check -----------------------------------------------------------------

def _spent(store, make_batch, usd: float, reserved: float = 0.0) -> str:
    """A capped batch that has spent ``usd`` on one answer and set aside ``reserved`` for another."""
    make_batch(store, "b", 4, max_cost=5.0)
    cids = [j.custom_id for j in store.lease("b", 0, 4, 30_000, "tok").jobs]
    store.complete("b", [("R", cids[0], json.dumps({"custom_id": cids[0]}), usd)])
    if reserved:
        assert store.reserve_cost("b", "tok|0", [(cids[1], reserved)])[1] == [True]
    return "b"


@pytest.mark.parametrize("cap, refused", [
    (0.25, True),  # below what is spent
    (0.3, True),  # exactly what is spent: the next job would pause it again at once
    (0.3001, False),
    (2.0, False),
    (0.0, False),  # no cap at all
])
def test_a_new_cap_must_be_above_what_the_batch_has_spent(store, make_batch, cap, refused):
    bid = _spent(store, make_batch, 0.3)
    if refused:
        with pytest.raises(CapTooLow) as exc:
            set_cap(store, bid, cap)
        assert store.options(bid).max_cost == 5.0  # nothing changed
        assert exc.value.committed == pytest.approx(0.3) and exc.value.cap == cap
        assert str(exc.value) == (f"batch b has already spent or set aside $0.3000; a cap of ${cap:.4f} would "
                                  f"pause it again at once")
        assert isinstance(exc.value, ValueError)  # run_batch's callers say it as any ValueError
    else:
        set_cap(store, bid, cap)
        assert store.options(bid).max_cost == cap


def test_the_cap_check_counts_what_requests_in_flight_set_aside(store, make_batch):
    bid = _spent(store, make_batch, 0.3, reserved=0.5)
    with pytest.raises(CapTooLow, match=r"\$0\.8000"):
        set_cap(store, bid, 0.7)
    set_cap(store, bid, 0.81)
    assert store.options(bid).max_cost == 0.81


def test_a_tiny_cap_reads_as_its_digits_not_as_zero(store, make_batch):
    bid = _spent(store, make_batch, 0.00003)
    with pytest.raises(CapTooLow, match=r"spent or set aside \$0\.000030; a cap of \$0\.000020 "):
        set_cap(store, bid, 0.00002)


@pytest.mark.parametrize("meta, capped", [
    ({"state": "paused", "reason": "the next job (x, up to $0.01) would take the batch past its --max-cost "
                                   "of $1.00 ($0.99 spent)"}, True),
    ({"state": "paused", "pause_kind": "cost_cap", "reason": "any words"}, True),  # what reserve_cost.lua writes
    ({"state": "paused", "reason": "insufficient_quota: check your plan and billing"}, False),
    ({"state": "running", "reason": "… past its --max-cost of $1.00"}, False),  # running again
    ({"state": "paused"}, False),
    ({"state": "paused", "reason": None}, False),
    ({}, False),
])
def test_paused_at_cap(meta, capped):
    assert paused_at_cap(meta) is capped


# --- the price merge ---------------------------------------------------------------

USER_FILE = """\
as_of = "2026-11-01"

[models."gpt-4o-mini"]
input = 0.2
cached_input = 0.1
output = 0.8

[models."my-llama"]
input = 0
cached_input = 0
output = 1
"""

STORED = PriceTable(as_of="2025-01-01", prices={"gpt-4o-mini": Price(1, 1, 1), "old-model": Price(2, 2, 2)},
                    sources=("stored",))


@pytest.mark.parametrize("stored, with_file, expect", [
    # a batch's own table stays its own: the shipped table does not come back under it
    (STORED, False, {"gpt-4o-mini": Price(1, 1, 1), "old-model": Price(2, 2, 2), "my-llama": None}),
    (STORED, True, {"gpt-4o-mini": Price(0.2, 0.1, 0.8), "old-model": Price(2, 2, 2), "my-llama": Price(0, 0, 1)}),
    # no table stored: the shipped one, with the file over it
    (None, True, {"gpt-4o-mini": Price(0.2, 0.1, 0.8), "my-llama": Price(0, 0, 1), "old-model": None}),
    (None, False, {"gpt-4o-mini": Price(0.15, 0.075, 0.6), "my-llama": None, "old-model": None}),
])
def test_merged_prices(tmp_path, stored, with_file, expect):
    path = tmp_path / "prices.toml"
    path.write_text(USER_FILE)
    table = merged_prices(stored.to_json() if stored else None, str(path) if with_file else None)
    for model, price in expect.items():
        assert table.prices.get(model) == price, model
    if stored:
        assert table.as_of == ("2026-11-01" if with_file else "2025-01-01")
        assert table.sources == (("stored", f"{path} (2026-11-01)") if with_file else ("stored",))
    else:
        assert table.prices.keys() >= PriceTable.load().prices.keys()


def test_a_bad_price_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[models."x"]\ninput = "cheap"\n')
    for stored in (STORED.to_json(), None):
        with pytest.raises(ValueError, match="bad.toml"):
            merged_prices(stored, str(path))
