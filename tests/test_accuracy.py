"""The rule both engines' GPU checks judge the plugin by (``zeroprefill.accuracy``)."""

from __future__ import annotations

import pytest

from zeroprefill import accuracy


def test_error_summary_nearest_rank() -> None:
    summary = accuracy.error_summary([float(v) for v in range(1, 101)])
    assert summary == {"count": 100, "50%": 50.0, "90%": 90.0, "99%": 99.0, "max": 100.0}
    assert accuracy.error_summary([3.0]) == {"count": 1, "50%": 3.0, "90%": 3.0, "99%": 3.0, "max": 3.0}
    with pytest.raises(ValueError):
        accuracy.error_summary([])


def test_tail_is_the_worst_below_a_thousand_values_then_the_99th_percentile() -> None:
    few = accuracy.error_summary([0.0] * 998 + [5.0])
    many = accuracy.error_summary([0.0] * 999 + [5.0])
    assert accuracy.tail(few) == ("worst", 5.0)
    assert accuracy.tail(many) == ("99th-percentile", 0.0)


def test_compare() -> None:
    stock = accuracy.error_summary([0.01] * 200 + [0.5])
    assert accuracy.compare("error", stock, stock, 0.05) == []
    within = accuracy.error_summary([0.019] * 200 + [0.54])
    assert accuracy.compare("error", within, stock, 0.05) == []
    median = accuracy.error_summary([0.021] * 200 + [0.5])
    assert accuracy.compare("error", median, stock, 0.05) == ["the plugin's median error 0.021 > 2 x stock's 0.01"]
    tail = accuracy.error_summary([0.01] * 200 + [0.56])
    assert accuracy.compare("error", tail, stock, 0.05, us="AsyncEP") == ["AsyncEP's worst error 0.56 > stock's 0.5 + 0.05"]
    few = accuracy.error_summary([0.5] * 10)  # too few values for a median: the tail alone
    assert accuracy.compare("error", few, accuracy.error_summary([0.49] * 10), 0.05) == []
