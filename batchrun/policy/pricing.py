"""What requests cost in USD: a price table per model, and the arithmetic on token counts.

batchrun ships a dated table (``batchrun/policy/prices.toml``) of OpenAI's standard list prices. Prices
change, so a user's own TOML file of the same shape, given by path or by ``BATCHRUN_PRICES``,
replaces or extends it model by model. A table travels as JSON (``to_json``/``from_json``) so
that a batch can keep the prices it was estimated with.

Prices are USD per 1,000,000 tokens, as OpenAI publishes them. Everything here is pure: no
Redis, no HTTP.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from types import MappingProxyType

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["ENV_PRICES", "Price", "PriceTable", "answer_cost", "cost_of_usage", "usage_is_readable",
           "usage_total_tokens", "worst_case_cost"]

#: Environment variable naming a user price file, used when no path is given.
ENV_PRICES = "BATCHRUN_PRICES"

_SHIPPED_FILE = "prices.toml"
_PER_TOKENS = 1_000_000  # prices are quoted per million tokens
_PRICE_FIELDS = ("input", "cached_input", "output")

# A dated snapshot suffix: "-2024-07-18" (current names) or "-0125" (older ones).
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True)
class Price:
    """A model's prices, in USD per 1M tokens."""

    input: float  # USD per 1M input tokens
    cached_input: float  # USD per 1M cached input tokens
    output: float  # USD per 1M output tokens


@dataclass(frozen=True)
class PriceTable:
    """Prices by model name, with the date they were published.

    ``as_of`` is the date of the shipped table, or the user file's own ``as_of`` when it gives
    one. ``sources`` says, for people, which files were merged (shipped first).
    """

    as_of: str
    prices: Mapping[str, Price]
    sources: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Read-only, so that a table shared by many callers cannot be changed under them.
        object.__setattr__(self, "prices", MappingProxyType(dict(self.prices)))

    @classmethod
    def load(cls, path: str | None = None) -> "PriceTable":
        """The shipped table, merged with the user file at ``path`` (or the file named by
        BATCHRUN_PRICES when ``path`` is None). Raises ValueError naming the file, the model
        and the reason when the user file is unreadable or wrong."""
        as_of, prices = _shipped()
        prices = dict(prices)
        sources = [f"shipped table ({as_of})"]
        if path is None:
            path = os.environ.get(ENV_PRICES) or None
        if path is not None:
            user_as_of, user_prices = _read_price_file(os.fspath(path))
            prices.update(user_prices)  # per model: the user's entry wins, others stay
            as_of = user_as_of or as_of
            sources.append(f"{path} ({user_as_of})" if user_as_of else str(path))
        return cls(as_of=as_of, prices=prices, sources=tuple(sources))

    def with_file(self, path: str) -> "PriceTable":
        """This table with the user file at ``path`` over it, model by model (a batch's stored
        table, updated by `resume --prices`)."""
        user_as_of, user_prices = _read_price_file(os.fspath(path))
        return PriceTable(as_of=user_as_of or self.as_of, prices={**self.prices, **user_prices},
                          sources=(*self.sources, f"{path} ({user_as_of})" if user_as_of else str(path)))

    def price_for(self, model: str) -> Price | None:
        """The price of ``model``: its exact name; else, for a dated snapshot
        ("gpt-4o-mini-2024-07-18", "gpt-3.5-turbo-0125"), its alias; else the longest known
        name that prefixes it at a "-" ("gpt-4o-mini-search" -> "gpt-4o-mini"). None if unknown."""
        price = self.prices.get(model)
        if price is not None:
            return price
        alias = _SNAPSHOT_SUFFIX.sub("", model)
        if alias != model and alias in self.prices:
            return self.prices[alias]
        parts = model.split("-")
        for end in range(len(parts) - 1, 0, -1):
            price = self.prices.get("-".join(parts[:end]))
            if price is not None:
                return price
        return None

    def to_json(self) -> str:
        """Compact JSON: {"as_of", "sources", "models": {name: [input, cached_input, output]}}."""
        models = {name: [p.input, p.cached_input, p.output] for name, p in sorted(self.prices.items())}
        return json.dumps({"as_of": self.as_of, "sources": list(self.sources), "models": models},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "PriceTable":
        """The table ``to_json`` wrote. Raises ValueError if ``text`` is not such a table."""
        try:
            data = json.loads(text)
            prices = {}
            for name, values in data["models"].items():
                if not isinstance(values, list) or len(values) != len(_PRICE_FIELDS):
                    raise ValueError(f"model {name!r}: expected [input, cached_input, output]")
                prices[name] = Price(*(_price_number(v, f) for v, f in zip(values, _PRICE_FIELDS)))
            return cls(as_of=str(data["as_of"]), prices=prices, sources=tuple(map(str, data.get("sources", ()))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a stored price table ({exc})") from None


def cost_of_usage(price: Price, usage: dict | None) -> float:
    """USD for one answer's `usage` object. Chat/completions: prompt_tokens (of which
    prompt_tokens_details.cached_tokens are cached), completion_tokens. Responses API:
    input_tokens (input_tokens_details.cached_tokens), output_tokens. Embeddings:
    prompt_tokens only. Missing/None usage -> 0.0."""
    if not isinstance(usage, Mapping):
        return 0.0
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        prefix_in, prefix_out = "prompt", "completion"
    else:
        prefix_in, prefix_out = "input", "output"
    input_tokens = _count(usage.get(f"{prefix_in}_tokens"))
    details = usage.get(f"{prefix_in}_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    cached = min(cached, input_tokens)  # cached tokens are part of the input, never more
    # Reasoning tokens are already inside completion/output tokens and billed as output.
    output_tokens = _count(usage.get(f"{prefix_out}_tokens"))
    return (
        (input_tokens - cached) * price.input + cached * price.cached_input + output_tokens * price.output
    ) / _PER_TOKENS


BATCH_API_SHARE = 0.5  # OpenAI's Batch API bills half the synchronous price, input and output alike


def batch_price(price: Price) -> Price:
    """The Batch API's price of a model whose synchronous price is ``price``."""
    return Price(input=price.input * BATCH_API_SHARE, cached_input=price.cached_input * BATCH_API_SHARE,
                 output=price.output * BATCH_API_SHARE)


def worst_case_cost(price: Price, input_tokens: int, output_tokens: int) -> float:
    """Input at the full (uncached) price plus the maximum output."""
    return (input_tokens * price.input + output_tokens * price.output) / _PER_TOKENS


_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "total_tokens")


def usage_is_readable(usage: object) -> bool:
    """Does ``usage`` say what the answer cost? An object with an input count (prompt_tokens or
    input_tokens), every count it has a finite number >= 0. Anything else (a string, a list, a
    negative or non-numeric count) says nothing, and is priced like a missing usage."""
    if not isinstance(usage, Mapping) or not ("prompt_tokens" in usage or "input_tokens" in usage):
        return False
    for name in _USAGE_COUNTS:
        if name in usage:
            value = usage[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                return False
    return True


def usage_total_tokens(usage: object) -> int:
    """The answer's total_tokens for the counts `status` shows; 0 when it cannot be read. Never raises."""
    return _count(usage.get("total_tokens")) if usage_is_readable(usage) else 0


def answer_cost(prices: list[Price | None], usage: object, input_tokens: int, output_tokens: int) -> float:
    """USD to count for an answer: by the highest of ``prices`` (the requested model's and the one
    the answer names: a server may answer with a dearer model), from its usage, or, where the usage
    cannot be read, the worst case of the request (``input_tokens``, ``output_tokens``). Never
    raises; 0.0 when no price is known."""
    known = [p for p in prices if p is not None]
    if not known:
        return 0.0
    if usage_is_readable(usage):
        return max(cost_of_usage(p, usage) for p in known)
    return max(worst_case_cost(p, input_tokens, output_tokens) for p in known)


# --- Reading price files -----------------------------------------------------------


@lru_cache(maxsize=1)
def _shipped() -> tuple[str, dict[str, Price]]:
    """The shipped table, read once per process."""
    source = resources.files("batchrun.policy").joinpath(_SHIPPED_FILE)
    as_of, prices = _parse_price_text(source.read_text(encoding="utf-8"), f"batchrun/policy/{_SHIPPED_FILE}")
    if not as_of:
        raise ValueError(f"batchrun/policy/{_SHIPPED_FILE} has no as_of date")  # a packaging bug
    return as_of, prices


def _read_price_file(path: str) -> tuple[str | None, dict[str, Price]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"price file {path}: cannot read it ({reason})") from None
    return _parse_price_text(text, path)


def _parse_price_text(text: str, path: str) -> tuple[str | None, dict[str, Price]]:
    """(as_of or None, prices) of a price file's text; ValueError names the file, model, reason."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(
            f"price file {path}: not valid TOML ({exc}); see batchrun/policy/{_SHIPPED_FILE} for the shape"
        ) from None
    unknown = sorted(set(data) - {"as_of", "models"})
    if unknown:
        raise ValueError(
            f"price file {path}: unknown top-level key {unknown[0]!r}; expected as_of = \"YYYY-MM-DD\" "
            "and one [models.\"NAME\"] table per model"
        )
    as_of = data.get("as_of")
    if as_of is not None and not isinstance(as_of, str):
        as_of = str(as_of)  # TOML's bare dates (as_of = 2025-08-07) arrive as datetime.date
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ValueError(f"price file {path}: 'models' must hold tables, as in [models.\"gpt-4o\"]")
    return as_of, {name: _parse_model(entry, path, name) for name, entry in models.items()}


def _parse_model(entry: object, path: str, model: str) -> Price:
    where = f"price file {path}, model {model!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table with input, cached_input and output (USD per 1M tokens)")
    missing = [name for name in _PRICE_FIELDS if name not in entry]
    if missing:
        raise ValueError(
            f"{where}: missing {', '.join(missing)}; give input, cached_input and output in USD per 1M tokens "
            "(cached_input = input when the model has no cache discount)"
        )
    unknown = sorted(set(entry) - set(_PRICE_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; the fields are input, cached_input and output")
    try:
        return Price(*(_price_number(entry[name], name) for name in _PRICE_FIELDS))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _price_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number (USD per 1M tokens), not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    return float(value)


def _count(value: object) -> int:
    """A token count from a usage object; anything odd counts as 0 rather than raising."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if not math.isfinite(value) or value < 0:
        return 0
    return int(value)
