"""batchrun.state.jobcounts: jobs ended and left, from counts (ints) or a meta hash (text)."""

from __future__ import annotations

import pytest

from batchrun.state.jobcounts import jobs_ended, jobs_left


@pytest.mark.parametrize("counts, ended, left", [
    ({"total": 10, "done": 3, "failed": 2, "in_flight": 4}, 5, 5),
    ({"total": "10", "done": "10", "failed": "0"}, 10, 0),  # a meta hash: Redis answers in text
    ({"total": "10", "done": "7", "failed": "3"}, 10, 0),  # errors are outcomes too
    ({"total": 4, "done": 5, "failed": 0}, 5, 0),  # never a negative count of jobs left
    ({"total": "3", "done": "", "failed": None}, 0, 3),  # fields not written yet
    ({}, 0, 0),
])
def test_jobs_ended_and_left(counts, ended, left):
    assert jobs_ended(counts) == ended
    assert jobs_left(counts) == left
