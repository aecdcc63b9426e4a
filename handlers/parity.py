"""Parity maths: how far an artifact's outputs are from the eager model's, and whether that is within tolerance.

torch + stdlib only: it travels inside every .mar, so a replica checks its own answers at load with the very
comparison the export gate and verify use (torchship.parity re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Elementwise |actual - eager| <= atol + rtol * |eager|; integer outputs must match exactly."""

    atol: float
    rtol: float


#: Relative error divides by |eager| clamped below at this, so exact zeros do not make it infinite.
REL_FLOOR = 1e-6


@dataclass(frozen=True)
class Comparison:
    """One output tensor compared with its eager reference."""

    max_abs: float
    max_rel: float
    passed: bool
    reason: str = ""


def compare(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Comparison:
    """Compare elementwise: |a - e| <= atol + rtol * |e|. Integer and bool tensors must be equal.

    Shape or dtype mismatches and NaN/Inf where the reference has none fail with a reason.
    """
    if actual.shape != expected.shape:
        return Comparison(float("inf"), float("inf"), False, f"shape {list(actual.shape)} != {list(expected.shape)}")
    if actual.dtype != expected.dtype:
        return Comparison(float("inf"), float("inf"), False, f"dtype {actual.dtype} != {expected.dtype}")
    if actual.numel() == 0:
        return Comparison(0.0, 0.0, True)
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    if not e.is_floating_point():
        diff = (a.to(torch.int64) - e.to(torch.int64)).abs()
        max_abs = float(diff.max())
        mismatches = int((diff != 0).sum())
        return Comparison(max_abs, max_abs, mismatches == 0, f"{mismatches} of {e.numel()} values differ" if mismatches else "")
    a64, e64 = a.to(torch.float64), e.to(torch.float64)
    finite_mismatch = torch.isfinite(a64) != torch.isfinite(e64)
    nonfinite_differs = (~torch.isfinite(e64)) & (a64 != e64) & ~(torch.isnan(a64) & torch.isnan(e64))
    if bool(finite_mismatch.any() | nonfinite_differs.any()):
        return Comparison(float("inf"), float("inf"), False, "non-finite values where eager has none (or vice versa)")
    finite = torch.isfinite(e64)
    diff = torch.where(finite, (a64 - e64).abs(), torch.zeros_like(a64))
    rel = diff / e64.abs().clamp_min(REL_FLOOR)
    allowed = tol.atol + tol.rtol * e64.abs()
    bad = int((diff > allowed).sum())
    reason = f"{bad} of {e.numel()} values outside atol={tol.atol:g} rtol={tol.rtol:g}" if bad else ""
    return Comparison(float(diff.max()), float(rel.max()), bad == 0, reason)


def compare_all(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], tol: Tolerance) -> Comparison:
    """Compare several outputs; the result holds the worst error and every failure reason."""
    if len(actual) != len(expected):
        return Comparison(float("inf"), float("inf"), False, f"{len(actual)} outputs, expected {len(expected)}")
    parts = [compare(a, e, tol) for a, e in zip(actual, expected, strict=True)]
    reasons = "; ".join(p.reason for p in parts if p.reason)
    return Comparison(
        max_abs=max(p.max_abs for p in parts),
        max_rel=max(p.max_rel for p in parts),
        passed=all(p.passed for p in parts),
        reason=reasons,
    )
