"""The one-run audit's statistics: a lower bound on epsilon from guesses about canaries.

Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS
2023). ``m`` canaries are each included independently with probability 1/2; the auditor
guesses "in" for ``k+`` of them and "out" for ``k-`` (abstaining on the rest) and gets
``v`` of its ``r = k+ + k-`` guesses right. Under (eps, delta)-DP the chance of ``v`` or
more correct guesses is at most ``P[Binomial(r, q) >= v] + 2 m delta alpha`` with
``q = e^eps / (1 + e^eps)`` and ``alpha = max_i P[v - i <= Binomial(r, q) < v] / i``
(their Theorem 5.2 and its Algorithm 2). The 95 % lower bound ``eps_lb`` is the largest
eps that this p-value still rejects at level 0.05. Binomial tails are scipy's.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

from stamen.common.errors import ConfigError


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest probability of ``v`` or more correct guesses of ``r`` under (``epsilon``, ``delta``)-DP."""
    check_counts(m, r, v)
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ConfigError(f"audit bound needs epsilon >= 0 and delta in [0, 1], got {epsilon!r}, {delta!r}")
    q = float(special.expit(epsilon))  # accuracy of epsilon-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))
    alpha = 0.0
    if v > 0 and delta > 0:
        below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v - i <= B < v], i = 1..v
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct guesses of ``r`` refute at ``confidence`` (0 if none).

    The p-value grows with epsilon, so bisection keeps ``p_value(low) < 1 - confidence``
    (``low`` is a valid lower bound) until it is within 1e-6 of where that stops holding.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    level = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, high * 2
        if high > 1e3:  # p-values this small: every guess right with an enormous r
            return low
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def ceiling(r: int, confidence: float = 0.95) -> float:
    """The most ``r`` guesses can show at delta 0, all of them right: ``ln(p / (1 - p))``,
    ``p = (1 - confidence)^(1/r)``. More canaries (more guesses) raise it."""
    p = (1 - confidence) ** (1 / r)
    return math.log(p / (1 - p))


def check_counts(m: int, r: int, v: int) -> None:
    """ConfigError unless ``0 <= v <= r <= m`` and ``m > 0``."""
    if not (0 <= v <= r <= m and m > 0):
        raise ConfigError(f"audit counts need 0 <= correct <= guesses <= canaries and canaries > 0, got {v}, {r}, {m}")
