"""experiments.features.generalization.kendall (τ, Jiang's Ψ, bootstrap), its report and figures, on hand-built tables."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments.features.generalization.kendall import (bootstrap, cluster_weights, compare, configuration_mean_tau,
                                                        granulated_tau, kendall_tau, weighted_tau_b)
from experiments.features.generalization.figures import write_figures
from experiments.features.generalization.report import (analyse, axis_table, render_markdown, summary_table,
                                                        within_lr, write_report)
from experiments.analysis.load import AnalysisError

B = 300  # bootstrap resamples in tests: enough for stable intervals, fast


def grid(a_values=(0, 1, 2), b_values=(0, 1, 2, 3), seeds=(0,), gap=lambda a, b, s: 10 * a + b, **measures):
    """One run per (a, b, seed); every measure is a function of (a, b, seed)."""
    rows = [{"run": f"a{a}-b{b}-s{s}", "a": a, "b": b, "seed": s, "reached": True, "gap": float(gap(a, b, s)),
             **{m: float(f(a, b, s)) for m, f in measures.items()}}
            for a, b, s in itertools.product(a_values, b_values, seeds)]
    return pd.DataFrame(rows)


def noisy(n_per_cell: int, seed: int = 0) -> pd.DataFrame:
    """A study where the measure follows the gap with noise: lr × bn × n_per_cell seeds."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, (lr, bn, s) in enumerate(itertools.product([0.01, 0.03, 0.1], [False, True], range(n_per_cell))):
        g = 0.02 / lr + 0.3 * bn + rng.normal(0, 0.5)
        rows.append({"run": f"r{k}", "lr": lr, "bn": bn, "seed": s, "reached": k % 11 != 3, "gap": g,
                     "sharpness": g + rng.normal(0, 0.7)})
    return pd.DataFrame(rows)


# -- τ ------------------------------------------------------------------------------------------------------------

def test_tau_by_hand_and_runs_that_did_not_reach_are_counted_not_used():
    # x rises; y = 2, 1, 4, 3, 3: pairs concordant C = 6, discordant D = 3 ((1,2), (3,4), (3,5)), one tie in y
    # ((4,5)). τ-b = (C − D) / sqrt((n0 − n1)(n0 − n2)) = 3 / sqrt(10 · 9).
    df = pd.DataFrame({"run": list("pqrstu"), "m": [1, 2, 3, 4, 5, 0.5], "gap": [2, 1, 4, 3, 3, 100.0],
                       "reached": [True] * 5 + [False]})
    t = kendall_tau(df, "m")
    assert t.value == pytest.approx(3 / math.sqrt(90), rel=1e-12)
    assert (t.n, t.n_not_reached, t.n_missing) == (5, 1, 0)
    assert t.p == pytest.approx(stats.kendalltau([1, 2, 3, 4, 5], [2, 1, 4, 3, 3]).pvalue)
    # a reached run with no measure value is counted as missing, not used
    df.loc[len(df)] = {"run": "v", "m": math.nan, "gap": 7.0, "reached": True}
    t = kendall_tau(df, "m")
    assert (t.n, t.n_not_reached, t.n_missing) == (5, 1, 1) and t.value == pytest.approx(3 / math.sqrt(90))


@pytest.mark.parametrize("f, expected", [(lambda g: np.exp(g / 10), 1.0), (lambda g: -g ** 3, -1.0)])
def test_monotone_measure_has_tau_and_psi_of_one(f, expected):
    df = grid(seeds=(0, 1), m=lambda a, b, s: f(10 * a + b))
    assert kendall_tau(df, "m").value == pytest.approx(expected)
    g = granulated_tau(df, "m", ["a", "b"])
    assert g.value == pytest.approx(expected) and g.by_axis() == pytest.approx({"a": expected, "b": expected})


def test_psi_per_axis_as_constructed():
    """Along a the measure follows the gap (ψ_a = 1); along b it is a permutation with C = D (ψ_b = 0)."""
    perm = [1, 3, 0, 2]  # τ(b, perm[b]) = 0: concordant (0,1), (0,3), (2,3); discordant (0,2), (1,2), (1,3)
    df = grid(seeds=(0, 1), indep=lambda a, b, s: 10 * a + perm[b], anti=lambda a, b, s: 10 * a - b)
    g = granulated_tau(df, "indep", ["a", "b"])
    assert g.by_axis() == pytest.approx({"a": 1.0, "b": 0.0}) and g.value == pytest.approx(0.5)
    assert [(x.axis, x.cells, x.skipped_single_value, x.skipped_undefined) for x in g.axes] == [
        ("a", 8, 0, 0), ("b", 6, 0, 0)]  # cells: 4 b-values × 2 seeds; 3 a-values × 2 seeds
    assert kendall_tau(df, "indep").value > 0.7  # the pooled τ is dominated by the a-axis
    g = granulated_tau(df, "anti", ["a", "b"])
    assert g.by_axis() == pytest.approx({"a": 1.0, "b": -1.0}) and g.value == pytest.approx(0.0)


def test_seed_is_held_fixed_in_a_cell():
    """A seed shifts gap and measure in opposite directions: pooled over seeds τ would mix that in, per seed ψ = 1."""
    df = grid(seeds=(0, 1, 2), gap=lambda a, b, s: 10 * a + b + 100 * s, m=lambda a, b, s: 10 * a + b - 100 * s)
    assert granulated_tau(df, "m", ["a", "b"]).value == pytest.approx(1.0)
    assert granulated_tau(df, "m", ["a", "b"], seed=None).value < 0  # pooling seeds: the seed effect dominates


def test_single_value_and_undefined_cells_are_skipped_and_counted():
    df = grid(a_values=(0, 1, 2), b_values=(0, 1), m=lambda a, b, s: 10 * a + b if a < 2 else 7.0)
    df = df[df["run"] != "a1-b1-s0"]  # at a = 1 only b = 0 is left: that b-cell has a single value
    g = granulated_tau(df, "m", ["a", "b"])
    a, b = g.axes
    # axis b: cell a=0 used (τ = 1), a=1 single value, a=2 constant measure → τ undefined
    assert (b.cells, b.skipped_single_value, b.skipped_undefined, b.value) == (1, 1, 1, 1.0)
    assert (a.cells, a.skipped_single_value, a.skipped_undefined) == (2, 0, 0)
    table = axis_table(analyse(df, ["m"], ["a", "b"], lr=None, n_resamples=50))
    assert table.set_index("axis").loc["b", ["cells", "skipped_single_value", "skipped_undefined"]].tolist() == [
        1, 1, 1]


def test_within_lr_reverses_a_correlation_that_comes_from_the_learning_rate():
    """Andriushchenko et al.'s warning: across lrs the measure tracks the gap, at each lr it runs against it."""
    lrs = (0.01, 0.03, 0.1)
    df = grid(a_values=lrs, b_values=(0, 1, 2, 3), seeds=(0, 1), gap=lambda lr, b, s: 1000 * lr + b + s / 10,
              m=lambda lr, b, s: 1000 * lr - b - s / 10).rename(columns={"a": "lr"})
    # pairs across lrs: 3 · 8² = 192 concordant; within an lr: 3 · 28 = 84 discordant; τ = 108 / 276
    assert kendall_tau(df, "m").value == pytest.approx(108 / 276)
    w = within_lr(df, "m", ["lr", "b"], n_resamples=50)
    assert w["lr"].tolist() == list(lrs) and w["tau"].tolist() == pytest.approx([-1.0] * 3)
    assert w["psi"].tolist() == pytest.approx([-1.0] * 3) and w["n"].tolist() == [8, 8, 8]
    assert (w["tau_high"] == -1).all()
    row = summary_table(analyse(df, ["m"], ["lr", "b"], n_resamples=50)).iloc[0]
    assert row["tau_lr=0.01"] == pytest.approx(-1) and row["psi_lr"] == pytest.approx(1)


# -- bootstrap ----------------------------------------------------------------------------------------------------

def test_weighted_tau_b_is_scipy_on_the_repeated_runs():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, 9).astype(float), rng.normal(size=9)  # ties in x
    w = rng.multinomial(9, np.full(9, 1 / 9), size=25)
    expected = [stats.kendalltau(np.repeat(x, k), np.repeat(y, k)).statistic for k in w]
    assert weighted_tau_b(x, y, w) == pytest.approx(expected, nan_ok=True)
    assert weighted_tau_b(x, y, np.ones((1, 9)))[0] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert math.isnan(weighted_tau_b(x, y, np.eye(9)[:1] * 9)[0])  # one run drawn 9 times: undefined


def configurations(n_lr: int = 4, seeds: int = 2, rng_seed: int = 0) -> pd.DataFrame:
    """n_lr learning rates × 2 batch sizes × BN on/off, ``seeds`` runs each; the measure follows the gap with noise."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for k, (lr, b, bn, s) in enumerate(itertools.product(np.geomspace(0.01, 0.3, n_lr), [32, 128], [False, True],
                                                          range(seeds))):
        g = 0.02 / lr + 0.3 * bn + b / 300 + rng.normal(0, 0.4)
        rows.append({"run": f"r{k}", "lr": lr, "b": b, "bn": bn, "seed": s, "reached": True, "gap": g,
                     "sharpness": g + rng.normal(0, 0.6)})
    return pd.DataFrame(rows)


def width(interval) -> float:
    return interval.high - interval.low


def test_bootstrap_contains_the_estimate_shrinks_with_configurations_and_is_deterministic():
    small, large = configurations(4), configurations(16)
    widths = []
    for df in (small, large):
        boot = bootstrap(df, "sharpness", ["lr", "b", "bn"], n_resamples=B)
        tau, g = kendall_tau(df, "sharpness").value, granulated_tau(df, "sharpness", ["lr", "b", "bn"])
        assert boot.tau.low <= tau <= boot.tau.high and boot.psi.low <= g.value <= boot.psi.high
        assert all(boot.axes[a].low <= v <= boot.axes[a].high for a, v in g.by_axis().items())
        assert boot.tau.n_resamples == B and boot.tau.n_undefined == 0
        widths.append((width(boot.tau), width(boot.psi)))
        assert bootstrap(df, "sharpness", ["lr", "b", "bn"], n_resamples=B) == boot  # same seed, same intervals
    assert widths[1][0] < widths[0][0] / 1.5 and widths[1][1] < widths[0][1] * 0.8   # 4× the configurations
    other = bootstrap(small, "sharpness", ["lr", "b", "bn"], n_resamples=B, rng_seed=1)
    assert other != bootstrap(small, "sharpness", ["lr", "b", "bn"], n_resamples=B)


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_duplicated_seeds_do_not_narrow_the_intervals_as_if_there_were_twice_the_data(rng_seed):
    """The resampling unit is the configuration: a second, identical copy of every seed adds no information, so the
    intervals stay about as wide (resampling runs as independent would narrow them by about 1/√2 ≈ 0.71)."""
    df = configurations(rng_seed=rng_seed)
    copied = pd.concat([df, df.assign(seed=df["seed"] + 100, run=df["run"] + "-copy")], ignore_index=True)
    axes = ["lr", "b", "bn"]
    once, twice = (bootstrap(d, "sharpness", axes, n_resamples=1000) for d in (df, copied))
    assert width(twice.tau) > 0.8 * width(once.tau)
    assert width(twice.psi) > 0.8 * width(once.psi)
    runs_as_units = [bootstrap(d, "sharpness", axes, n_resamples=1000, cluster=[]) for d in (df, copied)]
    assert width(runs_as_units[1].tau) < 0.78 * width(runs_as_units[0].tau)  # what the test guards against


def test_cluster_weights_draw_whole_configurations_then_their_seeds():
    codes = np.array([0, 0, 1, 1, 1, 2])
    w = cluster_weights(codes, 500, 0)
    per_config = np.stack([w[:, codes == c].sum(1) for c in range(3)], 1)
    sizes = np.array([2, 3, 1])
    assert (per_config % sizes == 0).all()          # each drawn copy of a configuration brings all its seeds' slots
    assert (per_config // sizes).sum(1).tolist() == [3] * 500   # 3 configurations drawn per resample
    assert (w[:, :2].min(1) == 0).any() and (w[:, :2] > 0).all(1).any()   # seeds within a copy are resampled
    assert (w == cluster_weights(codes, 500, 0)).all()


def test_seed_noise_within_cells_widens_psi():
    """Two seeds that disagree on every cell's sign: Ψ = 0 on the data, and resampling seeds within a configuration
    must let Ψ* move (a bootstrap that only resampled configurations would leave every cell pair in place)."""
    df = grid(a_values=(0, 1), b_values=tuple(range(8)), seeds=(0, 1), gap=lambda a, b, s: a + 0.01 * b,
              m=lambda a, b, s: (a if s == 0 else -a) + 0.01 * b)
    g = granulated_tau(df, "m", ["a", "b"])
    assert g.by_axis()["a"] == pytest.approx(0.0)
    boot = bootstrap(df, "m", ["a", "b"], n_resamples=B)
    assert boot.axes["a"].low < -0.2 and boot.axes["a"].high > 0.2


def test_paired_comparison_uses_the_same_resamples():
    df = configurations().assign(same=lambda d: d["sharpness"], shifted=lambda d: d["sharpness"] * 2 + 1)
    d = compare(df, "sharpness", "same", ["lr", "b", "bn"], n_resamples=B)
    assert d.tau == 0 and (d.tau_interval.low, d.tau_interval.high) == (0, 0)   # monotone transform: τ identical
    noise = configurations(rng_seed=5)["sharpness"]
    d = compare(df.assign(other=noise.to_numpy()), "sharpness", "other", ["lr", "b", "bn"], n_resamples=B)
    assert d.tau == pytest.approx(kendall_tau(df, "sharpness").value
                                  - kendall_tau(df.assign(other=noise.to_numpy()), "other").value)
    assert d.tau_interval.low <= d.tau <= d.tau_interval.high and d.n == 32 and d.n_configurations == 16


def test_configuration_mean_tau_averages_seeds_first():
    df = grid(a_values=(0, 1, 2), b_values=(0,), seeds=(0, 1), gap=lambda a, b, s: a + 10 * s,
              m=lambda a, b, s: a - 10 * s)
    assert kendall_tau(df, "m").value < 0   # pooled runs: the seed effect runs against
    t = configuration_mean_tau(df, "m", ["a", "b"])
    assert t.value == pytest.approx(1.0) and t.n == 3


# -- report and figures -------------------------------------------------------------------------------------------

def test_report_lists_runs_that_did_not_reach_and_writes_md_and_csv(tmp_path):
    df = noisy(4)
    out = write_report(df, ["sharpness"], ["lr", "bn"], tmp_path, gap_label="test error − train error",
                       n_resamples=B)
    text = out.read_text()
    skipped = df.loc[~df["reached"], "run"].tolist()
    assert skipped == ["r3", "r14"] and all(f"- `{r}` (lr=" in text for r in skipped)
    assert "**test error − train error**" in text
    assert "24 runs: 22 reached the target training loss" in text and "2 did not" in text
    csv = pd.read_csv(tmp_path / "generalization.csv")
    assert csv.loc[0, "n_used"] == 22 and csv.loc[0, "n_not_reached"] == 2
    assert {"tau", "tau_low", "tau_high", "psi", "psi_low", "psi_high", "psi_lr", "psi_bn", "tau_lr=0.01"} <= set(
        csv.columns)
    assert csv.loc[0, "tau"] == pytest.approx(kendall_tau(df, "sharpness").value)
    assert "| sharpness | 22 | " in text  # n used
    assert render_markdown(df, analyse(df, ["sharpness"], ["lr", "bn"], n_resamples=B), ["lr", "bn"],
                           gap_label="test error − train error") == text


def test_figures_are_byte_identical_when_written_twice(tmp_path):
    df = noisy(3).assign(flat=lambda d: 10 ** d["gap"].rank())  # positive over decades: log x-axis
    results = analyse(df, ["sharpness", "flat"], ["lr", "bn"], n_resamples=50)
    first = write_figures(df, results, tmp_path / "one")  # colour: bn
    second = write_figures(df, results, tmp_path / "two", hue="bn")
    assert sorted(p.name for p in first) == ["generalization_coefficients.pdf", "generalization_coefficients.png",
                                             "measure_vs_gap.pdf", "measure_vs_gap.png"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
        assert a.stat().st_size > 5_000


# -- bad input ----------------------------------------------------------------------------------------------------

def test_bad_input_raises_an_error_naming_what_is_wrong():
    df = noisy(2)
    with pytest.raises(AnalysisError, match="no column 'gap'.*generalisation gap"):
        kendall_tau(df.drop(columns="gap"), "sharpness")
    with pytest.raises(AnalysisError, match="measure column 'sharpness' is not numeric.*'n/a' in run 'r0'"):
        kendall_tau(df.assign(sharpness=["n/a"] + df["sharpness"].tolist()[1:]), "sharpness")
    with pytest.raises(AnalysisError, match="only 2 usable run.*need at least 3.*did not reach"):
        kendall_tau(df.assign(reached=[True, True] + [False] * (len(df) - 2)), "sharpness")
    with pytest.raises(AnalysisError, match="no column 'width'"):
        granulated_tau(df, "sharpness", ["lr", "width"])
    with pytest.raises(AnalysisError, match="'reached' must be bool"):
        kendall_tau(df.assign(reached=1), "sharpness")
    with pytest.raises(AnalysisError, match="'seed' is the seed column"):
        granulated_tau(df, "sharpness", ["lr", "seed"])


def overlapping_tick_labels(fig) -> list[str]:
    """Pairs of x tick labels, in any visible panel of ``fig``, whose drawn boxes overlap."""
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    found = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        labels = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        found += [f"{ax.get_title()!r}: {a.get_text()} / {b.get_text()}"
                  for (a, p), (b, q) in itertools.combinations(zip(labels, boxes), 2) if p.overlaps(q)]
    return found


def test_measure_vs_gap_tick_labels_do_not_overlap():
    """Measures of order 1e-3 over a narrow range (worst-case sharpness) wrote labels like 0.00075 that overlapped."""
    from experiments.features.generalization.figures import measure_vs_gap
    rank = noisy(3)["gap"].rank()
    df = noisy(3).assign(tiny=7e-4 + 1.6e-3 * rank / len(rank), small=2e-3 * rank, large=4000 + 40 * rank)
    results = analyse(df, ["tiny", "small", "large", "sharpness"], ["lr", "bn"], n_resamples=50)  # 4 panels a row
    assert overlapping_tick_labels(measure_vs_gap(df, results, "bn")) == []
