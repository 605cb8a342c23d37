"""Sharpness versus generalisation: rank correlations between a measure and the generalisation gap over a study.

The input is a DataFrame, one row per run (``run``, the hyper-parameter axes, ``seed``, ``gap``, ``reached``, one
column per measure); runs that did not reach the target are counted, never dropped silently. The results: Kendall's
τ, Jiang et al.'s granulated Ψ, both also within each fixed learning rate, cluster-bootstrap intervals over
configurations, and paired comparisons of two measures.

Details: docs/explanation/modules.md#generalization-kendall
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from scipy import stats

from experiments.analysis.load import AnalysisError
from experiments.analysis.stats import CONFIDENCE

BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0
MIN_RUNS = 3


@dataclass(frozen=True)
class Interval:
    """Percentile bootstrap interval; ``n_undefined`` resamples gave no value and are left out."""
    low: float
    high: float
    n_resamples: int
    n_undefined: int


@dataclass(frozen=True)
class Tau:
    """Kendall's τ-b between a measure and the gap over ``n`` runs that reached the target."""
    measure: str
    value: float
    p: float
    n: int
    n_not_reached: int
    n_missing: int


@dataclass(frozen=True)
class AxisTau:
    """ψ_i: the mean τ over ``cells`` cells in which only ``axis`` varies."""
    axis: str
    value: float
    cells: int
    skipped_single_value: int
    skipped_undefined: int


@dataclass(frozen=True)
class Granulated:
    """Ψ = mean of the defined ψ_i (Jiang et al. 2020); ``n`` runs used."""
    measure: str
    value: float
    axes: tuple[AxisTau, ...]
    n: int
    n_not_reached: int
    n_missing: int

    def by_axis(self) -> dict[str, float]:
        return {a.axis: a.value for a in self.axes}


@dataclass(frozen=True)
class Bootstrap:
    tau: Interval
    psi: Interval
    axes: dict[str, Interval]


# -- input --------------------------------------------------------------------------------------------------------

def _need(df: pd.DataFrame, column: str, what: str) -> None:
    if column not in df.columns:
        raise AnalysisError(f"no column {column!r} ({what}); the table has columns {list(df.columns)}")


def usable_runs(df: pd.DataFrame, measure: str, gap: str = "gap", axes=(), seed: str | None = None,
                min_runs: int = MIN_RUNS) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Check the table and split it: (usable, not reached, reached but measure or gap missing).

    Raises ``AnalysisError`` naming the column at fault, or when fewer than ``min_runs`` runs are usable.
    """
    _need(df, "run", "one row per run, named")
    _need(df, "reached", "bool: the run reached the target training loss")
    _need(df, gap, "the generalisation gap, test minus train; pass gap=<column> if it is named otherwise")
    _need(df, measure, "the measure")
    for axis in axes:
        _need(df, axis, "a hyper-parameter axis")
        if df[axis].isna().any():
            raise AnalysisError(f"axis {axis!r} has no value for run(s) {list(df.loc[df[axis].isna(), 'run'])}")
    if seed is not None:
        _need(df, seed, "the seed; pass seed=None to pool seeds")
        if seed in axes:
            raise AnalysisError(f"{seed!r} is the seed column, not a hyper-parameter axis: leave it out of axes")
    if df["run"].duplicated().any():
        raise AnalysisError(f"runs listed twice: {sorted(set(df.loc[df['run'].duplicated(), 'run']))}")
    if not is_bool_dtype(df["reached"]):
        raise AnalysisError(f"column 'reached' must be bool (reached the target training loss), not "
                            f"{df['reached'].dtype}")
    for column, what in ((measure, "measure"), (gap, "gap")):
        if is_bool_dtype(df[column]) or not is_numeric_dtype(df[column]):
            bad = df[column][pd.to_numeric(df[column], errors="coerce").isna() & df[column].notna()]
            example = f" (e.g. {bad.iloc[0]!r} in run {df.loc[bad.index[0], 'run']!r})" if len(bad) else ""
            raise AnalysisError(f"{what} column {column!r} is not numeric: dtype {df[column].dtype}{example}")
    reached = df[df["reached"]]
    finite = np.isfinite(reached[measure].astype(float)) & np.isfinite(reached[gap].astype(float))
    usable, missing = reached[finite], reached[~finite]
    if len(usable) < min_runs:
        raise AnalysisError(f"{measure!r}: only {len(usable)} usable run(s) (reached the target, finite {measure!r} "
                            f"and {gap!r}); need at least {min_runs}. {len(df) - len(reached)} did not reach the "
                            f"target, {len(missing)} have a missing value")
    return usable, df[~df["reached"]], missing


# -- coefficients -------------------------------------------------------------------------------------------------

def _tau_b(x, y) -> tuple[float, float]:
    res = stats.kendalltau(np.asarray(x, float), np.asarray(y, float))  # τ-b; NaN for a constant column
    return float(res.statistic), float(res.pvalue)


def kendall_tau(df: pd.DataFrame, measure: str, gap: str = "gap") -> Tau:
    """τ-b(measure, gap) over the runs that reached the target (Jiang et al. 2020)."""
    usable, not_reached, missing = usable_runs(df, measure, gap)
    value, p = _tau_b(usable[measure], usable[gap])
    return Tau(measure, value, p, len(usable), len(not_reached), len(missing))


def cells(usable: pd.DataFrame, axis: str, axes, seed: str | None) -> list[np.ndarray]:
    """Row positions in ``usable`` of each (other axes, seed) cell, in a fixed order."""
    keys = [a for a in axes if a != axis] + ([seed] if seed is not None else [])
    if not keys:
        return [np.arange(len(usable))]
    groups = usable.reset_index(drop=True).groupby(keys, sort=True, dropna=False).indices
    return [np.asarray(groups[k]) for k in sorted(groups, key=repr)]


def granulated_tau(df: pd.DataFrame, measure: str, axes, gap: str = "gap", seed: str | None = "seed") -> Granulated:
    """Ψ and ψ_i per axis (Jiang et al. 2020); cells are (other axes, seed) combinations (module doc)."""
    axes = list(axes)
    if not axes:
        raise AnalysisError("granulated τ needs at least one hyper-parameter axis")
    usable, not_reached, missing = usable_runs(df, measure, gap, axes, seed)
    x, y = usable[measure].to_numpy(float), usable[gap].to_numpy(float)
    per_axis = []
    for axis in axes:
        values = usable[axis].to_numpy()
        taus, single, undefined = [], 0, 0
        for idx in cells(usable, axis, axes, seed):
            if pd.unique(values[idx]).size < 2:
                single += 1
                continue
            t = _tau_b(x[idx], y[idx])[0]
            if math.isnan(t):
                undefined += 1
            else:
                taus.append(t)
        per_axis.append(AxisTau(axis, float(np.mean(taus)) if taus else math.nan, len(taus), single, undefined))
    defined = [a.value for a in per_axis if not math.isnan(a.value)]
    return Granulated(measure, float(np.mean(defined)) if defined else math.nan, tuple(per_axis), len(usable),
                      len(not_reached), len(missing))


# -- bootstrap ----------------------------------------------------------------------------------------------------

def weighted_tau_b(x, y, weights) -> np.ndarray:
    """τ-b of each resample, where row b of ``weights`` (resamples × runs) says how often each run was drawn.

    Equal to ``scipy.stats.kendalltau(np.repeat(x, w), np.repeat(y, w))`` for each row w: τ-b = (C − D) /
    sqrt((n0 − n1)(n0 − n2)) with n0 = N(N − 1)/2 pairs of the N drawn runs, n1 (n2) of them tied in x (y); the
    copies of one run are tied in both. As quadratic forms, C − D = ½ wᵀSw with S_ab = sign(x_a − x_b)·sign(y_a −
    y_b), and the ties between distinct runs are ½ wᵀTw with T_ab = [x_a = x_b], a ≠ b. NaN where the denominator is 0.
    """
    x, y, w = np.asarray(x, float), np.asarray(y, float), np.asarray(weights, float)
    dx, dy = x[:, None] - x[None, :], y[:, None] - y[None, :]
    off_diagonal = ~np.eye(len(x), dtype=bool)

    def form(matrix):
        return ((w @ matrix) * w).sum(1) / 2

    n = w.sum(1)
    n0 = n * (n - 1) / 2
    copies = (w * (w - 1) / 2).sum(1)
    tied_x = form(((dx == 0) & off_diagonal).astype(float))
    tied_y = form(((dy == 0) & off_diagonal).astype(float))
    den = np.sqrt(np.maximum(n0 - copies - tied_x, 0) * np.maximum(n0 - copies - tied_y, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, form(np.sign(dx) * np.sign(dy)) / den, np.nan)


def _interval(values: np.ndarray, confidence: float) -> Interval:
    ok = values[np.isfinite(values)]
    if not len(ok):
        return Interval(math.nan, math.nan, len(values), len(values))
    lo, hi = np.percentile(ok, [50 * (1 - confidence), 50 * (1 + confidence)])
    return Interval(float(lo), float(hi), len(values), len(values) - len(ok))


def configuration_codes(usable: pd.DataFrame, cluster) -> np.ndarray:
    """One integer per row of ``usable``: its configuration (combination of the ``cluster`` columns); with no
    columns every run is its own configuration."""
    cluster = list(cluster)
    if not cluster:
        return np.arange(len(usable))
    return usable.reset_index(drop=True).groupby(cluster, sort=True, dropna=False).ngroup().to_numpy()


def cluster_weights(codes: np.ndarray, n_resamples: int, rng_seed: int) -> np.ndarray:
    """Resamples × runs: how often each run is drawn when the configurations are drawn with replacement and, for
    each drawn copy of a configuration, its runs are drawn with replacement (two-stage cluster bootstrap)."""
    rng = np.random.default_rng(rng_seed)
    configs = np.unique(codes)
    copies = rng.multinomial(len(configs), np.full(len(configs), 1 / len(configs)), size=n_resamples)
    w = np.zeros((n_resamples, len(codes)), dtype=np.int64)
    for k, c in enumerate(configs):
        idx = np.flatnonzero(codes == c)
        # m copies each drawing len(idx) runs uniformly: together one multinomial of m · len(idx) draws
        w[:, idx] = rng.multinomial(copies[:, k] * len(idx), np.full(len(idx), 1 / len(idx)))
    return w


def _resampled_psi(usable, x, y, axes, seed, w) -> dict[str, np.ndarray]:
    per_axis = {}
    for axis in axes:
        codes = pd.factorize(usable[axis])[0]
        cell_taus, cell_weights = [], []
        for idx in cells(usable, axis, axes, seed):
            differ = (codes[idx, None] != codes[None, idx]).astype(float)   # pairs across values of θ_i
            wc = w[:, idx].astype(float)
            drawn_pairs = ((wc @ differ) * wc).sum(1) / 2
            full_pairs = differ.sum() / 2
            t = weighted_tau_b(x[idx], y[idx], wc)
            ok = np.isfinite(t) & (drawn_pairs > 0)
            cell_taus.append(np.where(ok, t, 0.0))
            cell_weights.append(np.where(ok, drawn_pairs / full_pairs, 0.0) if full_pairs else np.zeros(len(w)))
        taus, weights = np.vstack(cell_taus), np.vstack(cell_weights)
        total = weights.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_axis[axis] = np.where(total > 0, (taus * weights).sum(0) / total, np.nan)
    return per_axis


@dataclass(frozen=True)
class _Resampled:
    tau: np.ndarray                 # τ* per resample
    psi: np.ndarray                 # Ψ* per resample (NaN without axes)
    axes: dict[str, np.ndarray]     # ψ_i* per resample


def _resample(usable: pd.DataFrame, df: pd.DataFrame, measure: str, axes, gap, seed, w) -> _Resampled:
    usable = usable.reset_index(drop=True)
    x, y = usable[measure].to_numpy(float), usable[gap].to_numpy(float)
    tau = weighted_tau_b(x, y, w)
    if not axes:
        return _Resampled(tau, np.full(len(w), np.nan), {})
    per_axis = _resampled_psi(usable, x, y, axes, seed, w)
    point = granulated_tau(df, measure, axes, gap, seed).by_axis()
    kept = [a for a in axes if not math.isnan(point[a])]
    psi = np.mean([per_axis[a] for a in kept], 0) if kept else np.full(len(w), np.nan)
    return _Resampled(tau, psi, per_axis)


def bootstrap(df: pd.DataFrame, measure: str, axes, gap: str = "gap", seed: str | None = "seed",
              n_resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED,
              confidence: float = CONFIDENCE, cluster=None) -> Bootstrap:
    """Percentile intervals of τ, Ψ and each ψ_i from one set of study-wide cluster resamples (module doc).

    ``cluster``: the columns whose combination is a configuration, the resampling unit (default ``axes``). Ψ*
    averages the axes whose ψ_i is defined on the full data; a resample in which one of them is undefined gives no
    Ψ*. ``axes`` may be empty (then only τ has an interval).
    """
    axes = list(axes)
    usable = usable_runs(df, measure, gap, axes, seed)[0]
    codes = configuration_codes(usable, axes if cluster is None else cluster)
    r = _resample(usable, df, measure, axes, gap, seed, cluster_weights(codes, n_resamples, rng_seed))
    return Bootstrap(_interval(r.tau, confidence), _interval(r.psi, confidence),
                     {a: _interval(v, confidence) for a, v in r.axes.items()})


@dataclass(frozen=True)
class Difference:
    """τ_a − τ_b and Ψ_a − Ψ_b over the ``n`` runs usable for both measures (``n_configurations`` configurations),
    with intervals from the same cluster resamples for both."""
    a: str
    b: str
    tau: float
    tau_interval: Interval
    psi: float
    psi_interval: Interval
    n: int
    n_configurations: int


def compare(df: pd.DataFrame, a: str, b: str, axes, gap: str = "gap", seed: str | None = "seed",
            n_resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED,
            confidence: float = CONFIDENCE) -> Difference:
    """Paired bootstrap of τ_a − τ_b and Ψ_a − Ψ_b over configurations (module doc), on the runs usable for both."""
    axes = list(axes)
    both = usable_runs(df, b, gap, axes, seed)[0]
    both = usable_runs(both, a, gap, axes, seed)[0]
    codes = configuration_codes(both, axes)
    w = cluster_weights(codes, n_resamples, rng_seed)
    ra, rb = (_resample(both, both, m, axes, gap, seed, w) for m in (a, b))
    tau = kendall_tau(both, a, gap).value - kendall_tau(both, b, gap).value
    psi = (granulated_tau(both, a, axes, gap, seed).value - granulated_tau(both, b, axes, gap, seed).value
           if axes else math.nan)
    return Difference(a, b, tau, _interval(ra.tau - rb.tau, confidence), psi, _interval(ra.psi - rb.psi, confidence),
                      len(both), len(np.unique(codes)))


def configuration_mean_tau(df: pd.DataFrame, measure: str, cluster, gap: str = "gap") -> Tau:
    """τ-b over configurations, measure and gap each averaged over the seeds (usable runs) of a configuration."""
    cluster = list(cluster)
    usable, not_reached, missing = usable_runs(df, measure, gap)
    means = usable.groupby(cluster, dropna=False)[[measure, gap]].mean() if cluster else usable[[measure, gap]]
    value, p = _tau_b(means[measure], means[gap]) if len(means) >= 2 else (math.nan, math.nan)
    return Tau(measure, value, p, len(means), len(not_reached), len(missing))
