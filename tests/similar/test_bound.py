"""The Clopper-Pearson upper bound against values computed independently (mpmath's
regularised incomplete beta at 40 digits, bisected: B(0.95; k + 1, n - k))."""

from __future__ import annotations

import pytest

from comeapi.similar.bound import upper_bound


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 10, 0.258865550893),
        (1, 10, 0.394163302437),
        (2, 20, 0.282618524886),
        (0, 299, 0.0099691467929),
        (0, 361, 0.00826409044873),
        (1, 361, 0.0130729543697),
        (5, 100, 0.102253377643),
        (10, 1000, 0.0169031751206),
        (3, 7, 0.774678415968),
    ],
)
def test_known_values(k: int, n: int, expected: float) -> None:
    assert upper_bound(k, n) == pytest.approx(expected, rel=1e-9)


def test_all_events_and_monotonicity() -> None:
    assert upper_bound(4, 4) == 1.0
    bounds = [upper_bound(k, 200) for k in range(10)]
    assert bounds == sorted(bounds) and len(set(bounds)) == 10
    assert upper_bound(0, 299) < 0.01 < upper_bound(0, 298)
    assert upper_bound(2, 50, confidence=0.99) > upper_bound(2, 50)


@pytest.mark.parametrize(("k", "n", "confidence"), [(-1, 5, 0.95), (6, 5, 0.95), (0, 5, 1.0)])
def test_impossible_arguments_are_refused(k: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        upper_bound(k, n, confidence)
