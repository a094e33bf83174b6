"""Tests for batchrun.policy.pricing: cost arithmetic (against sums worked out by hand), model lookup,
user price files and the JSON round trip."""

from __future__ import annotations

import pytest

from batchrun.policy.pricing import ENV_PRICES, Price, PriceTable, cost_of_usage, worst_case_cost

MINI = Price(input=0.15, cached_input=0.075, output=0.60)  # gpt-4o-mini, USD per 1M tokens


@pytest.fixture(autouse=True)
def no_user_prices(monkeypatch):
    # A BATCHRUN_PRICES in the developer's environment must not change what "shipped" means.
    monkeypatch.delenv(ENV_PRICES, raising=False)


# --- cost_of_usage -----------------------------------------------------------------


def test_chat_usage_with_cached_prompt_tokens():
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 200},
    }
    # 800 uncached x 0.15/1M = 0.00012; 200 cached x 0.075/1M = 0.000015; 500 out x 0.60/1M = 0.0003
    assert cost_of_usage(MINI, usage) == pytest.approx(0.00012 + 0.000015 + 0.0003)
    assert cost_of_usage(MINI, usage) == pytest.approx(0.000435)


def test_chat_usage_without_details():
    usage = {"prompt_tokens": 2_000_000, "completion_tokens": 1_000_000, "prompt_tokens_details": None}
    # 2M x 0.15/1M = 0.30; 1M x 0.60/1M = 0.60
    assert cost_of_usage(MINI, usage) == pytest.approx(0.90)


def test_responses_usage():
    price = Price(input=1.25, cached_input=0.125, output=10.0)  # gpt-5
    usage = {
        "input_tokens": 4000,
        "input_tokens_details": {"cached_tokens": 3000},
        "output_tokens": 1200,
        "output_tokens_details": {"reasoning_tokens": 1000},  # inside output_tokens already
        "total_tokens": 5200,
    }
    # 1000 x 1.25/1M = 0.00125; 3000 x 0.125/1M = 0.000375; 1200 x 10/1M = 0.012
    assert cost_of_usage(price, usage) == pytest.approx(0.00125 + 0.000375 + 0.012)
    assert cost_of_usage(price, usage) == pytest.approx(0.013625)


def test_embeddings_usage_is_input_only():
    price = Price(input=0.02, cached_input=0.02, output=0.0)  # text-embedding-3-small
    # 50,000 x 0.02/1M = 0.001
    assert cost_of_usage(price, {"prompt_tokens": 50_000, "total_tokens": 50_000}) == pytest.approx(0.001)


@pytest.mark.parametrize("usage", [None, {}, "12", {"prompt_tokens": None, "completion_tokens": "x"}])
def test_missing_or_odd_usage_costs_nothing(usage):
    assert cost_of_usage(MINI, usage) == 0.0


def test_cached_tokens_never_exceed_the_prompt():
    usage = {"prompt_tokens": 100, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 500}}
    # all 100 prompt tokens cached: 100 x 0.075/1M = 0.0000075
    assert cost_of_usage(MINI, usage) == pytest.approx(0.0000075)


def test_worst_case_cost():
    # 10,000 in x 0.15/1M = 0.0015; 2,000 out x 0.60/1M = 0.0012
    assert worst_case_cost(MINI, 10_000, 2_000) == pytest.approx(0.0027)
    # gpt-4o: 3M in x 2.50/1M = 7.50; 1M out x 10/1M = 10.00
    assert worst_case_cost(Price(2.50, 1.25, 10.0), 3_000_000, 1_000_000) == pytest.approx(17.50)
    assert worst_case_cost(MINI, 0, 0) == 0.0


# --- The shipped table and lookup --------------------------------------------------


def test_shipped_table_is_dated_and_has_the_common_models():
    table = PriceTable.load()
    assert len(table.as_of) == 10 and table.as_of[4] == "-"  # YYYY-MM-DD
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4-turbo",
                  "gpt-3.5-turbo", "o1", "o1-mini", "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini",
                  "gpt-5-nano", "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"):
        assert model in table.prices, model
    assert table.prices["gpt-4o-mini"] == MINI
    for model in ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"):
        price = table.prices[model]
        assert price.output == 0 and price.cached_input == price.input


@pytest.mark.parametrize(
    "model, known_as",
    [
        ("gpt-4o-mini", "gpt-4o-mini"),  # exact
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # dated snapshot
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),  # old-style -MMDD snapshot
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),  # not "gpt-4": the longest name wins
        ("o1-mini-2024-09-12", "o1-mini"),  # not "o1"
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # a snapshot with its own price: exact first
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-search-preview", "gpt-4o-mini"),  # prefix at a "-"
        ("o1-preview", "o1"),
    ],
)
def test_price_for_snapshots_and_prefixes(model, known_as):
    table = PriceTable.load()
    assert table.price_for(model) == table.prices[known_as]


@pytest.mark.parametrize("model", ["llama-3-70b", "gpt-4oo", "o10", "ft:gpt-4o-mini:acme::abc123", "", "gpt"])
def test_unknown_model_has_no_price(model):
    assert PriceTable.load().price_for(model) is None


def test_prefix_only_at_a_dash():
    table = PriceTable(as_of="2026-01-01", prices={"gpt-5": Price(1, 1, 1)})
    assert table.price_for("gpt-5-pro") == Price(1, 1, 1)
    assert table.price_for("gpt-50") is None


# --- User price files --------------------------------------------------------------

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


def test_user_file_replaces_and_extends_per_model(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(USER_FILE)
    shipped = PriceTable.load()
    table = PriceTable.load(str(path))
    assert table.price_for("gpt-4o-mini") == Price(0.2, 0.1, 0.8)
    assert table.price_for("gpt-4o-mini-2024-07-18") == Price(0.2, 0.1, 0.8)  # the snapshot follows
    assert table.price_for("my-llama") == Price(0.0, 0.0, 1.0)
    assert table.price_for("gpt-4o") == shipped.price_for("gpt-4o")  # untouched models stay
    assert table.as_of == "2026-11-01"
    assert table.sources == (f"shipped table ({shipped.as_of})", f"{path} (2026-11-01)")
    assert shipped.price_for("my-llama") is None  # the shipped table is not changed by a load


def test_user_file_without_a_date_keeps_the_shipped_date(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[models."x"]\ninput = 1\ncached_input = 1\noutput = 2\n')
    assert PriceTable.load(str(path)).as_of == PriceTable.load().as_of


def test_env_names_the_user_file(tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    path.write_text(USER_FILE)
    monkeypatch.setenv(ENV_PRICES, str(path))
    assert PriceTable.load().price_for("my-llama") == Price(0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    "text, needles",
    [
        ('[models."gpt-4o"\ninput = 1', ["not valid TOML"]),
        ('[models."gpt-4o"]\ninput = -1\ncached_input = 1\noutput = 2\n', ["'gpt-4o'", "input", ">= 0", "-1"]),
        ('[models."gpt-4o"]\ninput = "2.50"\ncached_input = 1\noutput = 2\n',
         ["'gpt-4o'", "input", "must be a number"]),
        ('[models."gpt-4o"]\ninput = true\ncached_input = 1\noutput = 2\n', ["'gpt-4o'", "must be a number"]),
        ('[models."gpt-4o"]\ninput = nan\ncached_input = 1\noutput = 2\n', ["'gpt-4o'", "finite"]),
        ('[models."my-model"]\ninput = 1\noutput = 2\n', ["'my-model'", "missing cached_input"]),
        ('[models."my-model"]\ninput = 1\ncached_input = 1\nouput = 2\n', ["'my-model'", "missing output"]),
        ('[models."my-model"]\ninput = 1\ncached_input = 1\noutput = 2\nextra = 3\n',
         ["'my-model'", "unknown field 'extra'"]),
        ('[models]\n"my-model" = 3\n', ["'my-model'", "expected a table"]),
        ('[model."gpt-4o"]\ninput = 1\n', ["unknown top-level key 'model'"]),
    ],
)
def test_bad_user_file_names_file_model_and_reason(tmp_path, text, needles):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        PriceTable.load(str(path))
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_missing_user_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.toml: cannot read it"):
        PriceTable.load(str(tmp_path / "nope.toml"))


# --- JSON round trip ---------------------------------------------------------------


def test_json_round_trip(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(USER_FILE)
    table = PriceTable.load(str(path))
    text = table.to_json()
    assert "\n" not in text and ", " not in text  # compact, for storing in Redis
    again = PriceTable.from_json(text)
    assert again == table
    assert again.price_for("gpt-4o-mini-2024-07-18") == Price(0.2, 0.1, 0.8)
    assert again.sources == table.sources


@pytest.mark.parametrize("text", ["", "[]", '{"as_of": "x"}', '{"as_of": "x", "models": {"m": [1, 2]}}',
                                  '{"as_of": "x", "models": {"m": [1, 2, -3]}}'])
def test_from_json_rejects_other_text(text):
    with pytest.raises(ValueError, match="not a stored price table"):
        PriceTable.from_json(text)


def test_table_cannot_be_changed_in_place():
    table = PriceTable.load()
    with pytest.raises(TypeError):
        table.prices["gpt-4o"] = Price(0, 0, 0)  # type: ignore[index]


# --- answers whose usage cannot be read (review findings 2 and 8) ------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from batchrun.policy.pricing import answer_cost, usage_is_readable, usage_total_tokens  # noqa: E402

_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens",
                                                       "output_tokens", "total_tokens", "prompt_tokens_details",
                                                       "input_tokens_details", "cached_tokens", "x"]),
                                      inner, max_size=5), max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(usage=_ANY, n_in=st.integers(0, 10**6), n_out=st.integers(0, 10**6))
def test_any_usage_gives_a_cost_of_at_least_zero_and_never_raises(usage, n_in, n_out):
    cost = answer_cost([MINI, None], usage, n_in, n_out)
    assert 0 <= cost < float("inf")
    assert usage_total_tokens(usage) >= 0
    if not usage_is_readable(usage):  # unreadable counts like missing: the worst case
        assert cost == pytest.approx(worst_case_cost(MINI, n_in, n_out))


@pytest.mark.parametrize("usage", [None, "n/a", 7, [1], {}, {"total_tokens": 5},
                                   {"prompt_tokens": -10, "completion_tokens": 2},
                                   {"prompt_tokens": 10, "completion_tokens": "2"},
                                   {"input_tokens": 10, "output_tokens": float("nan")},
                                   {"prompt_tokens": 10, "total_tokens": True}])
def test_unreadable_usage_costs_the_worst_case(usage):
    assert not usage_is_readable(usage)
    assert answer_cost([MINI], usage, 1000, 100) == pytest.approx(worst_case_cost(MINI, 1000, 100))


def test_an_answer_is_priced_by_the_dearer_model():
    dear = Price(input=2.5, cached_input=1.25, output=10.0)
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    assert answer_cost([MINI, dear], usage, 5, 5) == pytest.approx(cost_of_usage(dear, usage))
    assert answer_cost([dear, MINI], usage, 5, 5) == pytest.approx(cost_of_usage(dear, usage))
    assert answer_cost([None, None], usage, 5, 5) == 0.0
    assert usage_total_tokens(usage) == 1100
