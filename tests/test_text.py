"""batchrun.text: the one way batchrun writes money, durations and plurals (issue 14)."""

from __future__ import annotations

import pytest

from batchrun.text import decoded, format_duration, format_usd, plural


@pytest.mark.parametrize("value, text", [
    (0, "$0.0000"),
    (0.0421, "$0.0421"),
    (0.3, "$0.3000"),
    (0.0104, "$0.0104"),  # estimate's old copy wrote $0.01
    (9.99994, "$9.9999"),
    (12.5, "$12.50"),
    (1234567.891, "$1,234,567.89"),
    (0.0001, "$0.0001"),
    (0.0000123, "$0.000012"),  # a tiny sum keeps two digits, never $0.0000
    (0.00005, "$0.000050"),
    (0.00000005, "$0.000000050"),
])
def test_format_usd(value, text):
    assert format_usd(value) == text


@pytest.mark.parametrize("seconds, text", [
    (None, "unknown"),
    (0, "0 s"),
    (42.4, "42 s"),
    (59.6, "1 min 00 s"),
    (60, "1 min 00 s"),
    (125, "2 min 05 s"),
    (3599, "59 min 59 s"),
    (3600, "1 h 00 min"),
    (3 * 3600 + 60 * 7, "3 h 07 min"),
    (50 * 3600, "50 h 00 min"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("n, suffix", [(0, "s"), (1, ""), (2, "s"), (1000, "s")])
def test_plural(n, suffix):
    assert plural(n) == suffix


@pytest.mark.parametrize("value, text", [(b"running", "running"), ("paused", "paused"), (3, "3"), (b"", "")])
def test_decoded(value, text):
    assert decoded(value) == text
