"""experiments.analysis.stats and .pairing against hand-computed cases."""
import math

import numpy as np
import pandas as pd
import pytest

from experiments.analysis import stats as st
from experiments.analysis.pairing import comparison_pairs, options_key, options_of, variant_labels
from experiments.analysis.report import compare_groups

# d = b − a = [1, 2, 4]: mean 7/3, sd² = ((4/3)² + (1/3)² + (5/3)²)/2 = 7/3, se = sqrt(7/9) = sqrt(7)/3.
# t = mean/se = sqrt(7). With 2 degrees of freedom the t distribution has a closed form: two-sided
# p = 1 − |t|/sqrt(t² + 2) = 1 − sqrt(7)/3, and the 97.5% quantile solves t/sqrt(t² + 2) = 0.95:
# t² = 2·0.95²/(1 − 0.95²).
A, B = [1.0, 1.0, 1.0], [2.0, 3.0, 5.0]
T_CRIT_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))


def test_paired_t_interval_and_dz_by_hand():
    c = st.paired(A, B)
    mean, se = 7 / 3, math.sqrt(7) / 3
    assert (c.test, c.n, c.effect_kind) == ("paired t", 3, "d_z")
    assert c.diff == pytest.approx(mean, rel=1e-12)
    assert c.p == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-9)
    assert T_CRIT_DF2 == pytest.approx(4.302653, rel=1e-6)
    assert (c.ci_low, c.ci_high) == pytest.approx((mean - T_CRIT_DF2 * se, mean + T_CRIT_DF2 * se), rel=1e-9)
    assert c.effect == pytest.approx(mean / math.sqrt(7 / 3), rel=1e-12)  # d_z = sqrt(7/3)
    # 3 pairs: no Wilcoxon (its p could not go below 0.25) and no bootstrap interval
    assert math.isnan(c.p_wilcoxon) and math.isnan(c.boot_low) and math.isnan(c.boot_high)


def test_paired_is_not_welch():
    """The same numbers unpaired: Welch gives another p; the paired test removes the shared per-seed offset."""
    a = np.array([10.0, 20.0, 30.0])
    b = a + np.array([1.0, 1.2, 0.9])
    assert st.paired(a, b).p < 0.01 < 0.5 < st.welch(a, b).p


def test_degenerate_inputs_give_no_p():
    same = st.paired([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])  # every difference exactly 1
    assert same.diff == 1 and math.isnan(same.p) and same.note == "identical differences"
    assert st.paired([1.0], [2.0]).test == "" and math.isnan(st.paired([1.0], [2.0]).p)
    flat = st.welch([1.0, 1.0], [2.0, 2.0])
    assert flat.diff == 1 and math.isnan(flat.p) and flat.note == "no spread in either group"
    assert st.welch([1.0], [2.0, 3.0]).test == ""


def test_welch_against_its_formula():
    a, b = np.array([1.0, 2.0, 4.0]), np.array([3.0, 5.0, 6.0, 9.0])
    c = st.welch(a, b, note="runs not paired")
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    t = (b.mean() - a.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # Welch–Satterthwaite
    from scipy.stats import t as t_dist
    assert c.p == pytest.approx(2 * t_dist.sf(abs(t), df), rel=1e-9)
    half = t_dist.ppf(0.975, df) * math.sqrt(va + vb)
    assert (c.ci_low, c.ci_high) == pytest.approx((b.mean() - a.mean() - half, b.mean() - a.mean() + half))
    pooled = math.sqrt((2 * a.var(ddof=1) + 3 * b.var(ddof=1)) / 5)
    assert c.effect == pytest.approx((1 - 3 / (4 * 7 - 9)) * (b.mean() - a.mean()) / pooled, rel=1e-12)
    assert (c.test, c.effect_kind, c.note) == ("Welch (unpaired)", "Hedges' g", "runs not paired")


def test_wilcoxon_only_from_six_pairs():
    """All differences positive: the exact two-sided signed-rank p is 2/2ⁿ, 1/32 at n = 6."""
    assert math.isnan(st.paired(np.zeros(5), np.arange(1.0, 6.0) ** 1.5).p_wilcoxon)
    assert st.paired(np.zeros(6), np.arange(1.0, 7.0) ** 1.5).p_wilcoxon == pytest.approx(2 / 2**6, rel=1e-12)


def test_bootstrap_only_from_ten_pairs_and_reproducible():
    rng = np.random.default_rng(3)
    a = rng.normal(size=10)
    b = a + 0.5 + rng.normal(scale=0.3, size=10)
    assert math.isnan(st.paired(a[:9], b[:9]).boot_low)
    c, again = st.paired(a, b), st.paired(a, b)
    assert c.boot_low < c.diff < c.boot_high and (c.boot_low, c.boot_high) == (again.boot_low, again.boot_high)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    # NaN (a metric without a test) is not part of the family: m = 2
    got = st.holm([math.nan, 0.01, 0.04])
    assert math.isnan(got[0]) and got[1:] == pytest.approx([0.02, 0.04], rel=1e-12)
    assert st.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert np.isnan(st.holm([math.nan, math.nan])).all()


def test_fisher_divergence_by_hand():
    # 4/4 vs 0/4 diverged: the observed table and its mirror are the 2 most extreme of C(8, 4) = 70
    assert st.fisher_divergence(4, 4, 0, 4) == pytest.approx(2 / 70, rel=1e-12)
    assert st.fisher_divergence(1, 2, 2, 2) == pytest.approx(1.0)
    assert math.isnan(st.fisher_divergence(0, 0, 1, 2))


def test_t_band_only_from_five_runs():
    sd = np.array([1.0, 1.0, 2.0])
    half = st.t_halfwidth(sd, np.array([4, 5, 10]))
    assert math.isnan(half[0])
    assert half[1] == pytest.approx(2.7764451 / math.sqrt(5), rel=1e-6)  # t(0.975, 4)
    assert half[2] == pytest.approx(2.2621572 * 2 / math.sqrt(10), rel=1e-6)  # t(0.975, 9)


CONFIG = {"model": "convnet", "norm": "none", "seed": 0, "lr": 0.04, "run_id": "x", "config_hash": "y",
          "study": "s", "device": "cpu", "tensorboard": False, "probe_every": 10, "subset": 0.1}


def test_options_exclude_identity_and_execution_and_ignore_int_vs_float():
    assert options_of(CONFIG) == {"probe_every": 10.0, "subset": 0.1}
    other = {**CONFIG, "model": "bn-convnet", "norm": "torch", "seed": 3, "lr": 1, "device": "cuda",
             "study": "elsewhere", "probe_every": 10.0}
    assert options_key(other) == options_key(CONFIG)
    assert options_key({**CONFIG, "probe_every": 5}) != options_key(CONFIG)
    assert options_key({**CONFIG, "new_option": True}) != options_key(CONFIG)  # unknown keys are kept


def test_variant_labels_name_only_what_differs():
    configs = [CONFIG, {**CONFIG, "seed": 1}, {**CONFIG, "probe_every": 5, "subset": 0.1}]
    assert variant_labels(configs) == ["probe_every=10", "probe_every=10", "probe_every=5"]
    assert variant_labels([CONFIG, {**CONFIG, "model": "bn-convnet", "seed": 2}]) == ["", ""]
    assert variant_labels([CONFIG, {k: v for k, v in CONFIG.items() if k != "subset"}]) == ["subset=0.1",
                                                                                            "subset=<unset>"]


def per_run(rows):
    return pd.DataFrame(rows, columns=["model", "variant", "lr", "seed", "options", "x"])


def test_pairs_within_variants_and_compare_names():
    runs = per_run([("convnet [p=5]", "p=5", 0.04, 0, "o5", 1.0), ("bn-convnet [p=5]", "p=5", 0.04, 0, "o5", 2.0),
                    ("convnet [p=10]", "p=10", 0.04, 0, "o10", 1.0), ("bn-convnet [p=10]", "p=10", 0.04, 0, "o10", 2.0),
                    ("convnet:noisy [p=5]", "p=5", 0.04, 0, "o5", 3.0)])
    assert sorted(comparison_pairs(runs)) == [("convnet [p=10]", "bn-convnet [p=10]"),
                                              ("convnet [p=5]", "bn-convnet [p=5]")]
    assert comparison_pairs(runs, ("convnet:noisy", "convnet")) == [("convnet:noisy [p=5]", "convnet [p=5]")]
    assert comparison_pairs(runs, ("convnet [p=10]", "bn-convnet [p=5]")) == [("convnet [p=10]", "bn-convnet [p=5]")]


def test_compare_groups_pairs_on_seed_and_falls_back_to_welch():
    a = per_run([("a", "", 0.04, s, "o", v) for s, v in zip(range(4), [1.0, 2.0, 3.0, 9.0])])
    b = per_run([("b", "", 0.04, s, "o", v) for s, v in zip([0, 1, 2, 7], [2.0, 4.0, 5.0, 0.0])])
    c, left_out = compare_groups(a, b, "x")  # seeds 0, 1, 2 pair; seed 3 of a and seed 7 of b have no partner
    assert (c.test, c.n, left_out) == ("paired t", 3, 2) and "2 run(s) without a partner" in c.note
    assert c.diff == pytest.approx(np.mean([1.0, 2.0, 2.0]))
    other = per_run([("b", "", 0.04, s, "o2", v) for s, v in zip(range(4), [2.0, 4.0, 5.0, 0.0])])
    w, _ = compare_groups(a, other, "x")  # same seeds, other options: not pairs
    assert (w.test, w.note) == ("Welch (unpaired)", "runs not paired (no shared seed and options)")
