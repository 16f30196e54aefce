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
    # (x - m) * (x - m), not ** 2: float ** raises OverflowError past ~1e154, a product gives inf
    return math.sqrt(sum((x - m) * (x - m) for x in xs) / (n - 1) / n)


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


def within_run(xs: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """(the standard error of one run's tail mean, corrected for autocorrelation (>= naive), its
    degrees of freedom: n_eff - 1, held at >= 1), both None below 2 values. Autocorrelated steps
    pin the mean down as n_eff independent ones would; a window of 2 or 3 steps has 1 or 2 degrees:
    its error is as shaky as two repeats' (see below). One autocorrelation time for both."""
    se = naive_stderr(xs)
    if se is None:
        return None, None
    tau = autocorrelation_time(xs)
    return se * math.sqrt(tau), max(1.0, len(xs) / tau - 1.0)


def within_run_stderr(xs: Sequence[float]) -> Optional[float]:
    return within_run(xs)[0]


def within_run_df(xs: Sequence[float]) -> Optional[float]:
    return within_run(xs)[1]


def between_runs_stderr(means: Sequence[float]) -> Optional[float]:
    """The standard error of the mean of n >= 2 repeats' tail means."""
    return naive_stderr(means)


# ---------------------------------------------------------------------------------------------
# "Beyond noise" with few repeats: Student's t, not 2.
#
# Two repeats give their mean's error one degree of freedom: an interval of 2 errors either side
# holds the truth far less than 95% of the time (two draws of the same configuration got a `*`
# 19% of the time at 2 repeats, 12% at 3, measured). The 95% critical value of Student's t with
# Welch-Satterthwaite's degrees of freedom is what makes "beyond noise" mean the same at every N.
# A run's tail window is the same case with n_eff - 1 degrees (`within_run`): with k = 2, two
# runs of one configuration with 2 clean steps each got a `*` 18% of the time, and windows of 10
# strongly autocorrelated steps (the tiny preset's 20-step runs) 18%.


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_critical(df: float, confidence: float = 0.95) -> float:
    """The two-sided critical value of Student's t with `df` (> 0, fractional allowed) degrees of
    freedom: P(|T| > t) = 1 - confidence. 12.71 at df 1, 4.30 at 2, 2.78 at 4, -> 1.96."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 1.0 - confidence
    if df > 1e7:
        df = 1e7  # (the normal limit, without lgamma's cancellation at huge df)
    lo, hi = 0.0, 1.0
    while _betainc(df / 2.0, 0.5, df / (df + hi * hi)) > tail:  # P(|T| > hi) still above the tail
        hi *= 2.0
    for _ in range(100):  # bisection: P(|T| > t) falls as t grows
        mid = (lo + hi) / 2.0
        if _betainc(df / 2.0, 0.5, df / (df + mid * mid)) > tail:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def welch_df(se_a: float, df_a: Optional[float], se_b: float, df_b: Optional[float]) -> Optional[float]:
    """Welch-Satterthwaite's degrees of freedom of the difference of two means with these standard
    errors and degrees of freedom (None: as good as infinite, e.g. a tail window of tens of steps).
    None when both are."""
    va, vb = se_a * se_a, se_b * se_b
    terms = [v * v / df for v, df in ((va, df_a), (vb, df_b)) if df is not None]
    if not terms:
        return None
    denominator = sum(terms)
    if denominator == 0:
        return None  # both errors zero: nothing to widen
    df = (va + vb) * (va + vb) / denominator
    return df if math.isfinite(df) and df > 0 else None  # (errors past the largest float: no t to take)
