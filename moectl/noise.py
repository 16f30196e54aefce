"""How noisy a tail mean is: within one run (autocorrelation-aware) or between repeated runs.

    within_run_stderr([dt_0, ..., dt_49])   # sd / sqrt(n_eff): one run's tail window
    between_runs_stderr([m_1, m_2, m_3])    # sd / sqrt(n) of the repeats' tail means

Within a run, step times are autocorrelated (a slow stretch, thermal drift, a noisy neighbour
lasting many steps), so the i.i.d. formula sd/sqrt(n) overstates how much the window has averaged
out. We divide by the effective sample size instead: n_eff = n / tau, with the integrated
autocorrelation time tau = -1 + 2 * sum of Geyer's initial positive sequence (pairs of sample
autocorrelations rho_{2m} + rho_{2m+1}, summed while positive: noisy high lags never add up to
nonsense). tau is held at >= 1, so the result is never below the i.i.d. error, which stays the
floor SPEC §7 calls it. Fewer than 4 values: no autocorrelation can be estimated; i.i.d. it is.

Between runs, each repeat's tail mean is one independent draw (its own process, its own seed):
the error of their mean is the plain sd/sqrt(n) over n >= 2 repeats. That is the error a reader
asking "does +2.7% survive a second run?" needs; a within-run error cannot answer it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

WITHIN_RUN = "within-run"
BETWEEN_RUNS = "between-runs"


def naive_stderr(xs: Sequence[float]) -> Optional[float]:
    """sd / sqrt(n) (sample sd, n - 1): right for independent values."""
    n = len(xs)
    if n < 2:
        return None
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def autocorrelation_time(xs: Sequence[float]) -> float:
    """tau >= 1 (see the module docstring); 1.0 when too short or constant."""
    n = len(xs)
    if n < 4:
        return 1.0
    m = sum(xs) / n
    d = [x - m for x in xs]
    c0 = sum(v * v for v in d) / n
    if c0 == 0:
        return 1.0

    def rho(k: int) -> float:
        return sum(d[t] * d[t + k] for t in range(n - k)) / n / c0

    total, k = 0.0, 0
    while k + 1 < n:
        pair = rho(k) + rho(k + 1)
        if pair <= 0:
            break
        total += pair
        k += 2
    return max(1.0, -1.0 + 2.0 * total)


def effective_sample_size(xs: Sequence[float]) -> float:
    return len(xs) / autocorrelation_time(xs)


def within_run_stderr(xs: Sequence[float]) -> Optional[float]:
    """The standard error of one run's tail mean, corrected for autocorrelation (>= naive)."""
    se = naive_stderr(xs)
    return None if se is None else se * math.sqrt(autocorrelation_time(xs))


def between_runs_stderr(means: Sequence[float]) -> Optional[float]:
    """The standard error of the mean of n >= 2 repeats' tail means."""
    return naive_stderr(means)
