"""The stop rule of export's measurements bounded in time (torchship/timing.py)."""

from __future__ import annotations

from torchship.timing import enough_samples

RULE = {"min_iters": 3, "max_iters": 9, "budget_s": 2.0}


def test_fast_calls_get_every_sample_and_slow_ones_stop_at_the_budget() -> None:
    assert not enough_samples(8, 0.1, **RULE) and enough_samples(9, 0.1, **RULE)  # fast: the full count
    assert not enough_samples(2, 5.0, **RULE)  # never fewer than min_iters, however slow
    assert not enough_samples(3, 1.9, **RULE) and enough_samples(3, 2.0, **RULE)  # slow: min_iters once the budget is spent
    assert enough_samples(9, 0.0, **RULE) and enough_samples(12, 0.0, **RULE)
