"""The statistics of a comparison between two models, from ``scipy.stats``; each rule stated where it is set.

- Paired runs (same seed, lr and options; see ``pairing``): the paired t-test on the differences d = b − a
  (``ttest_rel``), the 95% t-interval of the mean difference (its ``confidence_interval``), and the effect size
  d_z = mean(d) / sd(d) (Cohen's d for paired differences, labelled d_z so that no one reads it as a between-group d).
- Wilcoxon signed-rank (``wilcoxon``) beside the t-test only from ``WILCOXON_MIN_N`` pairs: below 6 pairs its exact
  two-sided p-value cannot fall below 2/2ⁿ ≥ 0.0625, so it could never reject at 5%.
- A bootstrap interval (``bootstrap``, BCa) of the mean difference only from ``BOOTSTRAP_MIN_N`` pairs: with fewer
  the resampling distribution has too few distinct values and the interval is too narrow.
- Runs with no partner: Welch's t-test (``ttest_ind(equal_var=False)``) with its interval and Hedges' g, always
  labelled as unpaired.
- Many metrics per comparison: Holm's step-down adjustment (family-wise error rate, valid however the metrics are
  correlated). scipy has only false-discovery-rate adjustments (``false_discovery_control``), so ``holm`` is written
  out below and tested against a hand computation.
- Divergence: Fisher's exact test (``fisher_exact``) on the 2×2 table diverged / not diverged × model.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
WILCOXON_MIN_N = 6
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 9999, 0
BAND_MIN_N = 5  # figures: a t-interval band around a mean curve only from 5 runs (n = 3 gives t = 4.3 · se)
PAIRED, WELCH = "paired t", "Welch (unpaired)"


@dataclass(frozen=True)
class Comparison:
    """b − a for one metric. ``n`` is the number of pairs (paired) or n_a + n_b (Welch)."""
    test: str                 # PAIRED, WELCH or "" (too few runs)
    n: int
    diff: float               # mean of the differences (paired) or difference of means (Welch)
    ci_low: float
    ci_high: float
    p: float
    effect: float
    effect_kind: str          # "d_z" (paired) or "Hedges' g" (Welch)
    p_wilcoxon: float = math.nan
    boot_low: float = math.nan
    boot_high: float = math.nan
    note: str = ""

    @classmethod
    def none(cls, n: int = 0, note: str = "") -> "Comparison":
        return cls("", n, math.nan, math.nan, math.nan, math.nan, math.nan, "", note=note)


def _quiet(fn, *args, **kwargs):
    """Call a scipy test; precision warnings on degenerate input become NaN results, not console noise."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def paired(a, b) -> Comparison:
    """Paired comparison of b − a over aligned per-pair values (``len(a) == len(b)``)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    n = len(d)
    if n < 2:
        return Comparison.none(n, "fewer than 2 pairs")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        # every seed moved by exactly the same amount: a t statistic would be infinite, and meaningless
        return Comparison(PAIRED, n, mean, mean, mean, math.nan, math.nan, "d_z", note="identical differences")
    res = _quiet(stats.ttest_rel, b, a)
    ci = res.confidence_interval(CONFIDENCE)
    p_w = math.nan
    if n >= WILCOXON_MIN_N and np.any(d != 0):
        p_w = float(_quiet(stats.wilcoxon, d).pvalue)
    lo = hi = math.nan
    if n >= BOOTSTRAP_MIN_N:
        boot = _quiet(stats.bootstrap, (d,), np.mean, confidence_level=CONFIDENCE, method="BCa",
                      n_resamples=BOOTSTRAP_RESAMPLES, rng=np.random.default_rng(BOOTSTRAP_SEED))
        lo, hi = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    return Comparison(PAIRED, n, mean, float(ci.low), float(ci.high), float(res.pvalue), mean / sd, "d_z",
                      p_wilcoxon=p_w, boot_low=lo, boot_high=hi)


def hedges_g(a: np.ndarray, b: np.ndarray) -> float:
    """J·(mean_b − mean_a)/s_pooled, s_pooled² = ((n_a−1)s_a² + (n_b−1)s_b²)/(n_a+n_b−2), J = 1 − 3/(4(n_a+n_b)−9)."""
    na, nb = len(a), len(b)
    pooled = math.sqrt(((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2))
    return math.nan if pooled == 0 else (1 - 3 / (4 * (na + nb) - 9)) * (np.mean(b) - np.mean(a)) / pooled


def welch(a, b, note: str = "") -> Comparison:
    """Unpaired comparison of b − a: Welch's t-test and interval, Hedges' g."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return Comparison.none(len(a) + len(b), "fewer than 2 runs in a group")
    diff = float(b.mean() - a.mean())
    if np.var(a) == 0 and np.var(b) == 0:
        return Comparison(WELCH, len(a) + len(b), diff, diff, diff, math.nan, math.nan, "Hedges' g",
                          note="no spread in either group")
    res = _quiet(stats.ttest_ind, b, a, equal_var=False)
    ci = res.confidence_interval(CONFIDENCE)
    return Comparison(WELCH, len(a) + len(b), diff, float(ci.low), float(ci.high), float(res.pvalue),
                      hedges_g(a, b), "Hedges' g", note=note)


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values; NaN entries stay NaN and do not count towards the family size m.

    Sorted ascending, p_(i) (i = 1..m) becomes max_{j ≤ i} min(1, (m − j + 1)·p_(j)).
    """
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def fisher_divergence(diverged_a: int, n_a: int, diverged_b: int, n_b: int) -> float:
    """Two-sided Fisher's exact p for the divergence counts of two models (n = runs with a known outcome)."""
    if n_a == 0 or n_b == 0:
        return math.nan
    table = [[diverged_a, n_a - diverged_a], [diverged_b, n_b - diverged_b]]
    return float(stats.fisher_exact(table).pvalue)


def t_halfwidth(sd, n):
    """Half-width of the 95% t-interval of a mean from its sd (ddof=1) and n; NaN where n < ``BAND_MIN_N``."""
    sd, n = np.asarray(sd, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
    return np.where(n >= BAND_MIN_N, half, np.nan)
