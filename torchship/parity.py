"""Parity maths (one copy, in the handler package that travels inside every archive; see handlers/parity.py)."""

from torchship.handlers.parity import REL_FLOOR, Comparison, compare, compare_all

__all__ = ["REL_FLOOR", "Comparison", "compare", "compare_all"]
