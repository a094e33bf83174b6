"""The chaos benchmark, shortened for CI: workers killed at random and a Redis restart mid-batch.

`bench/chaos.py` is the full version (5 runs of 3,000 jobs); this is one run of 400.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

pytestmark = [pytest.mark.redis,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start one")]


def test_kills_and_a_redis_restart_lose_and_double_nothing():
    import chaos

    r = chaos.run_once(n_jobs=400, workers=3, kill_every=2.0, seed=11)
    assert r["redis_restarts"] == 1 and r["kills"] >= 1, r
    assert r["missing"] == 0 and r["lines"] == r["distinct"] == 400, r
    assert r["errors"] == 0 and r["mismatched"] == 0, r
