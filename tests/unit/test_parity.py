"""Parity maths: the comparison every gate and every verify relies on."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchship.parity import compare, compare_all
from torchship.spec import Tolerance

TOL = Tolerance(atol=1e-5, rtol=1e-4)


def test_identical_passes_with_zero_error() -> None:
    x = torch.randn(4, 10)
    c = compare(x.clone(), x, TOL)
    assert c.passed and c.max_abs == 0.0 and c.max_rel == 0.0


def test_outside_tolerance_fails_and_counts() -> None:
    e = torch.ones(2, 3)
    a = e.clone()
    a[0, 0] += 1e-2
    c = compare(a, e, TOL)
    assert not c.passed
    assert abs(c.max_abs - 1e-2) < 1e-6
    assert "1 of 6 values" in c.reason


def test_shape_and_dtype_mismatch_fail() -> None:
    assert "shape" in compare(torch.zeros(2, 3), torch.zeros(3, 2), TOL).reason
    assert "dtype" in compare(torch.zeros(2, dtype=torch.float64), torch.zeros(2), TOL).reason


def test_integers_must_match_exactly_whatever_the_tolerance() -> None:
    e = torch.tensor([[1, 2, 3]])
    assert compare(e.clone(), e, Tolerance(1.0, 1.0)).passed
    c = compare(torch.tensor([[1, 2, 4]]), e, Tolerance(1.0, 1.0))
    assert not c.passed and c.max_abs == 1.0


def test_nan_where_eager_is_finite_fails() -> None:
    e = torch.zeros(3)
    a = e.clone()
    a[1] = float("nan")
    assert not compare(a, e, Tolerance(1e9, 1e9)).passed


def test_compare_all_reports_the_worst() -> None:
    e1, e2 = torch.zeros(2), torch.ones(2)
    c = compare_all((e1, e2 + 1.0), (e1, e2), TOL)
    assert not c.passed and c.max_abs == 1.0
    assert not compare_all((e1,), (e1, e2), TOL).passed


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=1, max_size=50),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_perturbation_within_atol_passes(values: list[float], fraction: float) -> None:
    e = torch.tensor(values, dtype=torch.float64)
    a = e + fraction * 1e-5 * 0.99
    assert compare(a, e, Tolerance(atol=1e-5, rtol=0.0)).passed


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False), min_size=1, max_size=50))
def test_perturbation_beyond_tolerance_fails(values: list[float]) -> None:
    e = torch.tensor(values, dtype=torch.float64)
    a = e.clone()
    a[0] += 1e-5 + 1e-4 * abs(values[0]) + 1e-3
    assert not compare(a, e, TOL).passed
