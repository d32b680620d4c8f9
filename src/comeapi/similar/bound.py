"""The one-sided Clopper-Pearson upper bound of a rate, from k events in n trials.

It is the p at which seeing k or fewer events in n trials has probability 1 - confidence:
the 95% bound on a false-hit rate after k false hits in n labelled near neighbours. (It is
the beta quantile B(confidence; k + 1, n - k); for integer arguments that is the binomial
tail solved for p, which needs no scipy: scipy's wheels are 35 MB for one function.)
With 0 false hits the bound is 1 - (1 - confidence) ** (1 / n): 299 examples are needed for
a bound under 1%.
"""

from __future__ import annotations

import math


def upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """The one-sided ``confidence`` upper bound of a rate after ``k`` events in ``n`` trials."""
    if not 0 <= k <= n or not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 <= k <= n and 0 < confidence < 1 (got {k}, {n}, {confidence})")
    alpha = 1.0 - confidence
    if k == n:
        return 1.0
    if k == 0:
        return 1.0 - math.pow(alpha, 1.0 / n)
    low, high = k / n, 1.0
    for _ in range(100):  # bisection: the tail is monotone in p; 100 halvings reach 1e-30
        mid = (low + high) / 2
        if _binomial_cdf(k, n, mid) > alpha:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n may be large, p tiny)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for j in range(k + 1):
        log_term = (
            math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            + j * log_p + (n - j) * log_q
        )  # fmt: skip
        total += math.exp(log_term)
    return min(total, 1.0)
