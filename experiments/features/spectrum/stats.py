"""Paired tests on the spectrum records: does BatchNorm remove the outliers, and do population statistics bring
them back (Ghorbani et al. 2019, §4–5)?

Two families, each Holm-adjusted over all its rows (``stats.holm``):

- *Networks*: at the first and the last epoch every network measured, each network against the first one
  (``model_order``; the plain network), train-mode Hessian (batch statistics). Runs pair on (lr, seed, options) as in
  the report (``pairing.PAIR_ON``), so each difference is between two networks that saw the same data order.
- *Population statistics*: for each network with a BatchNorm layer, running − batch statistics at the same weights
  (the two records of one run), at the same epochs.

Metrics: λ_max; λ_max/λ_k (top over k-th eigenvalue: an isolated outlier group makes it large); λ_max/rms, where
rms = sqrt(tr(H²)/n) is the bulk's scale from the quadrature; and the gradient concentration in the top-k
eigenspace.
"""
from __future__ import annotations

import pandas as pd

from experiments.analysis import stats as st
from experiments.analysis.load import family_pairs, model_order
from experiments.analysis.report import compare_groups
from experiments.analysis.tables import families_markdown, fmt, fmt_p

METRICS = (("lambda_max", "λ_max"), ("outlier_ratio", "λ_max / λ_k"), ("bulk_ratio", "λ_max / rms"),
           ("gradient_concentration", "concentration"))
HEADER = ["epoch", "metric", "a", "b", "pairs", "mean of b − a", "95% CI", "p (paired t)", "p (Holm)", "d_z"]


def _epochs(table: pd.DataFrame) -> list[int]:
    """First and last epoch that every network measured in batch mode."""
    batch = table[table["bn_mode"] == "batch"]
    common = sorted(set.intersection(*(set(g["epoch"]) for _, g in batch.groupby("model"))))
    return sorted({common[0], common[-1]}) if common else []


def _rows(cases) -> list[list[str]]:
    """``cases``: (epoch, label, name_a, name_b, frame_a, frame_b); one paired test per case, then Holm."""
    tested = [(epoch, label, na, nb, compare_groups(a, b, column)[0]) for epoch, (column, label), na, nb, a, b
              in cases]
    adjusted = st.holm([c.p for *_, c in tested])
    return [[str(epoch), label, na, nb, str(c.n) + ("" if c.test == st.PAIRED else f" ({c.test or 'none'})"),
             fmt(c.diff), f"{fmt(c.ci_low)} to {fmt(c.ci_high)}", fmt_p(c.p), fmt_p(p_holm), fmt(c.effect, 3)]
            for (epoch, label, na, nb, c), p_holm in zip(tested, adjusted)]


def comparison_markdown(table: pd.DataFrame) -> str:
    """The two families of paired tests as markdown sections (empty string when nothing can be compared). Runs of
    different configurations (``variant``) are never compared or pooled: each variant gets its own families."""
    if "variant" not in table:
        return _variant_markdown(table, "")
    return "\n".join(_variant_markdown(table[table["variant"] == v], v) for v in dict.fromkeys(table["variant"]))


def _variant_markdown(table: pd.DataFrame, variant: str) -> str:
    t = table.assign(outlier_ratio=table["lambda_max"] / table["lambda_k"],
                     bulk_ratio=table["lambda_max"] / table["rms_eigenvalue"])
    epochs = _epochs(t)
    networks, population = [], []
    for _, at_lr in t.groupby("lr"):
        batch = at_lr[at_lr["bn_mode"] == "batch"]
        for epoch in epochs:
            for first, other in family_pairs(batch["model"]):
                ref = batch[(batch["model"] == first) & (batch["epoch"] == epoch)]
                b = batch[(batch["model"] == other) & (batch["epoch"] == epoch)]
                networks += [(epoch, m, first, other, ref, b) for m in METRICS]
            for model in model_order(at_lr["model"]):
                rows = at_lr[(at_lr["model"] == model) & (at_lr["epoch"] == epoch)]
                if {"batch", "running"} <= set(rows["bn_mode"]):
                    population += [(epoch, m, f"{model} batch", f"{model} running",
                                    rows[rows["bn_mode"] == "batch"], rows[rows["bn_mode"] == "running"])
                                   for m in METRICS]
    of_variant = f" ({variant})" if variant else ""
    families = [("Networks (train-mode Hessian)", networks),
                ("Population statistics (same weights, running − batch)", population)]
    return families_markdown(HEADER, [(f"Paired tests{of_variant}: {title}", _rows(cases) if cases else [])
                                      for title, cases in families],
                             "Each family Holm-adjusted over all its rows; pairs = runs with the same seed, lr and "
                             "options (a Welch test, labelled, where fewer than 2 pairs exist).")
