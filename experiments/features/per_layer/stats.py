"""Paired tests on the per-layer records at the last epoch: which layers' curvature does BatchNorm change, and
through the GGN or through the rest of the Hessian (H − G)?

Two families, each Holm-adjusted over all its rows (``stats.holm``):

- *BatchNorm*: every network against the first one (``model_order``: the plain network), per layer position the
  networks share (conv1, conv2, fc) and per metric (λ_max of the H and G blocks, their traces, tr(H − G) of the
  block), and the whole Hessian's λ_min. Runs pair on (lr, seed, options) (``pairing.PAIR_ON``): the same seed, so
  the same training subset and data order.
- *H vs G*: within each network and layer, λ_max(H_BB) − λ_max(G_BB) of the same run. For a network that is
  piecewise linear in each layer's weights (ReLU, max-pooling, no normalisation) the network's output is linear in
  one layer's weights, so the H − G term of a diagonal block vanishes and the difference is exactly 0 (up to
  float32 rounding: ``ROUNDING``); so is the last layer's in any network, and a layer's right before a BatchNorm is
  not, because normalisation is not linear in the weights before it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.features.per_layer.compute import WHOLE
from experiments.analysis import stats as st
from experiments.analysis.load import family_pairs, model_order
from experiments.analysis.report import compare_groups
from experiments.analysis.tables import families_markdown, fmt, fmt_p

METRICS = (("lambda_H", "λ_max(H)"), ("lambda_G", "λ_max(G)"), ("trace_H", "tr(H)"), ("trace_G", "tr(G)"),
           ("trace_rest", "tr(H − G)"))
HEADER = ["layer", "metric", "a", "b", "pairs", "mean of b − a", "95% CI", "p (paired t)", "p (Holm)", "d_z"]
_RUN = ["run", "model", "lr", "seed", "variant", "options"]
# λ_max(H_BB) and λ_max(G_BB) of a block where H_BB = G_BB come out of float32 products by two routes (double
# backward, jvp + vjp) and differ by ~1e-8 relative; differences within this fraction count as none
ROUNDING = 1e-5


def last_epoch(table: pd.DataFrame) -> int:
    """The last epoch every network measured."""
    return min(int(g["epoch"].max()) for _, g in table.groupby("model"))


def per_run(table: pd.DataFrame, epoch: int) -> pd.DataFrame:
    """One row per (run, layer) at ``epoch``: lambda_H, lambda_G, trace_H, trace_G, trace_rest; the whole network's
    row (layer ``all``) holds lambda_min."""
    at = table[table["epoch"] == epoch]
    blocks = at[at["layer"] != WHOLE]
    wide = blocks.pivot_table(index=_RUN + ["layer"], columns="matrix", values=["lambda_max", "trace"],
                              aggfunc="first")
    wide.columns = [f"{'lambda' if v == 'lambda_max' else 'trace'}_{'H' if m == 'hessian' else 'G'}"
                    for v, m in wide.columns]
    wide = wide.reset_index()
    if {"trace_H", "trace_G"} <= set(wide.columns):
        wide["trace_rest"] = wide["trace_H"] - wide["trace_G"]
    whole = at[at["layer"] == WHOLE][_RUN + ["layer", "lambda_min"]]
    return pd.concat([wide, whole], ignore_index=True)


def _rows(cases) -> list[list[str]]:
    """``cases``: (layer, label, name_a, name_b, frame_a, frame_b, column); one paired test each, then Holm."""
    tested = [(layer, label, na, nb, compare_groups(a, b, column)[0]) for layer, label, na, nb, a, b, column
              in cases]
    adjusted = st.holm([c.p for *_, c in tested])
    return [[layer, label, na, nb, str(c.n) + ("" if c.test == st.PAIRED else f" ({c.test or 'none'})")
             + (f" ({c.note})" if c.note and c.test == st.PAIRED else ""),
             fmt(c.diff), f"{fmt(c.ci_low)} to {fmt(c.ci_high)}", fmt_p(c.p), fmt_p(p_holm), fmt(c.effect, 3)]
            for (layer, label, na, nb, c), p_holm in zip(tested, adjusted)]


def comparison_markdown(table: pd.DataFrame) -> str:
    """The two families of paired tests at the last epoch as markdown sections ("" when nothing compares). Runs of
    different configurations (``variant``: options other than model, lr and seed) are never compared or pooled:
    each variant gets its own families, at its own last epoch."""
    variants = list(dict.fromkeys(table["variant"])) if "variant" in table else [""]
    return "\n".join(_variant_markdown(table[table["variant"] == v] if "variant" in table else table, v)
                     for v in variants)


def _variant_markdown(table: pd.DataFrame, variant: str) -> str:
    epoch = last_epoch(table)
    runs = per_run(table, epoch)
    networks, within = [], []
    for _, at_lr in runs.groupby("lr"):
        models = model_order(at_lr["model"])
        of = {m: at_lr[at_lr["model"] == m] for m in models}
        for first, other in family_pairs(models):
            shared = [lay for lay in dict.fromkeys(of[first]["layer"]) if lay != WHOLE
                      and lay in set(of[other]["layer"])]
            for layer in shared:
                a, b = (of[m][of[m]["layer"] == layer] for m in (first, other))
                networks += [(layer, label, first, other, a, b, column) for column, label in METRICS
                             if column in a.columns]
            a, b = (of[m][of[m]["layer"] == WHOLE] for m in (first, other))
            networks.append(("whole", "λ_min(H)", first, other, a, b, "lambda_min"))
        for model in models:
            for layer in dict.fromkeys(of[model]["layer"]):
                if layer == WHOLE:
                    continue
                rows = of[model][of[model]["layer"] == layer]
                h, g = rows["lambda_H"], rows["lambda_G"]
                if ((h - g).abs() <= ROUNDING * np.maximum(h.abs(), g.abs())).all():
                    h = g  # two float32 routes to the same matrix: equal, not a 1e-9 "effect" with a p-value
                within.append((layer, "λ_max: H − G", f"{model} G", f"{model} H", rows.assign(value=g),
                               rows.assign(value=h), "value"))
    of_variant = f" ({variant})" if variant else ""
    models = model_order(runs["model"])
    bases = list(dict.fromkeys(a for a, _ in family_pairs(models))) or models[:1]
    families = [(f"BatchNorm: each network − {', '.join(bases)}, paired by seed", networks),
                ("H vs G: λ_max of the Hessian block − λ_max of the GGN block, same run", within)]
    return families_markdown(HEADER, [(f"Paired tests at epoch {epoch}{of_variant}: {title}", _rows(cases) if cases
                                       else []) for title, cases in families],
                             "Each family Holm-adjusted over all its rows; pairs = runs with the same seed, lr and "
                             "options (a Welch test, labelled, where fewer than 2 pairs exist); 95% CI: paired "
                             "t-interval.")
