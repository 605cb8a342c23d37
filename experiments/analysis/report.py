"""The report of a study: runs and divergence per model and lr, means over seeds, paired comparisons between models.

Tables (pandas, also the report.csv):

- ``divergence_table``: per (lr, model) the runs, how many finished, diverged, are unfinished, the divergence rate
  diverged / (done + diverged) (unfinished runs have no outcome yet) and Fisher's exact p against the model it is
  compared to. Divergence is an outcome, not missing data.
- ``summary_table``: per (lr, metric, model) n, mean and sd (ddof=1) over the runs that ``metrics.averaged`` admits
  (done runs; unfinished ones only with ``include_unfinished``); ``survivors_only`` where some runs of that model and
  lr diverged, so that the mean is over the survivors. The row of model b of each compared pair (a, b) carries the
  comparison b − a from ``stats``: paired t on the per-seed differences with its 95% t-interval and d_z, Wilcoxon
  beside it from 6 pairs, a BCa bootstrap interval from 10 pairs, Welch only for runs without a partner; ``p_holm``
  adjusts ``p`` across the metrics of that comparison (Holm).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from experiments.atomic import atomic_write_text
from experiments.analysis import stats as st
from experiments.analysis.load import AnalysisError, model_order, read_study, records_frame, runs_frame
from experiments.analysis.metrics import METRICS, averaged, metric_bn_mode, run_metrics
from experiments.analysis.pairing import comparison_pairs, pair_up
from experiments.features import FEATURES, resolve
from experiments.analysis.tables import fmt, fmt_p, md_table

SUMMARY_COLUMNS = ["lr", "metric", "label", "bn_mode", "model", "variant", "n", "mean", "sd", "diverged",
                   "unfinished", "survivors_only", "compared_to", "test", "n_compared", "left_out", "diff", "ci_low",
                   "ci_high", "effect", "effect_kind", "p", "p_holm", "p_wilcoxon", "boot_low", "boot_high", "note"]
DIVERGENCE_COLUMNS = ["lr", "model", "runs", "done", "diverged", "unfinished", "divergence_rate", "compared_to",
                      "p_fisher"]
ALPHA = 0.05


def _group_counts(runs: pd.DataFrame) -> dict:
    return {s: int((runs["status"] == s).sum()) for s in ("done", "diverged", "unfinished")}


def divergence_table(runs: pd.DataFrame, compare=None) -> pd.DataFrame:
    """One row per (lr, model): run counts by status, divergence rate, Fisher's exact p on the row of model b."""
    runs = runs.drop_duplicates("run")
    pairs = comparison_pairs(runs, compare)
    rows = []
    for lr in sorted(runs["lr"].unique()):
        at_lr = runs[runs["lr"] == lr]
        counts = {m: _group_counts(at_lr[at_lr["model"] == m]) for m in model_order(at_lr["model"])}
        for model, c in counts.items():
            known = c["done"] + c["diverged"]
            rows.append({"lr": lr, "model": model, "runs": sum(c.values()), **c,
                         "divergence_rate": c["diverged"] / known if known else math.nan})
        for a, b in pairs:
            if a in counts and b in counts:
                ca, cb = counts[a], counts[b]
                p = st.fisher_divergence(ca["diverged"], ca["done"] + ca["diverged"],
                                         cb["diverged"], cb["done"] + cb["diverged"])
                next(r for r in rows if r["lr"] == lr and r["model"] == b).update(compared_to=a, p_fisher=p)
    return pd.DataFrame(rows, columns=DIVERGENCE_COLUMNS)


def compare_groups(a: pd.DataFrame, b: pd.DataFrame, column: str) -> tuple[st.Comparison, int]:
    """b − a for one metric: paired on (lr, seed, options) where at least 2 pairs exist, else Welch.

    Returns the comparison and how many runs with a value were left out for lack of a partner.
    """
    va, vb = a[column].dropna().to_numpy(), b[column].dropna().to_numpy()
    pairs = pair_up(a, b, column)
    if len(pairs) >= 2:
        left_out = len(va) + len(vb) - 2 * len(pairs)
        note = f"{left_out} run(s) without a partner left out" if left_out else ""
        c = st.paired(pairs["a"].to_numpy(), pairs["b"].to_numpy())
        return dataclasses.replace(c, note="; ".join(filter(None, [c.note, note]))), left_out
    note = ("runs not paired (no shared seed and options)" if len(pairs) == 0
            else "only 1 pair: unpaired test over all runs")
    return st.welch(va, vb, note=note), 0


def summary_table(df: pd.DataFrame, compare=None, include_unfinished: bool = False) -> pd.DataFrame:
    """One row per (lr, metric, model) (``SUMMARY_COLUMNS``); comparison columns on the row of model b of each pair."""
    per_run = run_metrics(df)
    use = averaged(per_run["status"], include_unfinished)
    models = model_order(per_run["model"])
    pairs = comparison_pairs(per_run, compare)
    variant = dict(zip(per_run["model"], per_run["variant"]))
    # only the metrics of features the study measured: a registered feature no run used adds no empty rows
    measured = [m for m in METRICS if (df["kind"] == m.kind).any()]
    rows = []
    for lr in sorted(per_run["lr"].unique()):
        at_lr = per_run[per_run["lr"] == lr]
        here = [m for m in models if (at_lr["model"] == m).any()]
        block = {}
        for m in measured:
            for model in here:
                runs = at_lr[at_lr["model"] == model]
                v = runs.loc[use[runs.index], m.name].dropna().to_numpy()
                counts = _group_counts(runs)
                block[(m.name, model)] = {
                    "lr": lr, "metric": m.name, "label": m.label_for(df), "bn_mode": metric_bn_mode(df, m), "model": model,
                    "variant": variant[model], "n": len(v), "mean": v.mean() if len(v) else math.nan,
                    "sd": v.std(ddof=1) if len(v) > 1 else math.nan, "diverged": counts["diverged"],
                    "unfinished": counts["unfinished"], "survivors_only": counts["diverged"] > 0 and len(v) > 0}
        for a, b in pairs:
            if a not in here or b not in here:
                continue
            ra, rb = (at_lr[(at_lr["model"] == g) & use[at_lr.index]] for g in (a, b))
            comps = [compare_groups(ra, rb, m.name) for m in measured]
            p_holm = st.holm([c.p for c, _ in comps])
            for m, (c, left_out), ph in zip(measured, comps, p_holm):
                row = block[(m.name, b)]
                row.update(compared_to=a, test=c.test, n_compared=c.n, left_out=left_out, diff=c.diff,
                           ci_low=c.ci_low, ci_high=c.ci_high, effect=c.effect, effect_kind=c.effect_kind, p=c.p,
                           p_holm=ph, p_wilcoxon=c.p_wilcoxon, boot_low=c.boot_low, boot_high=c.boot_high,
                           note=c.note)
                row["survivors_only"] = row["survivors_only"] or block[(m.name, a)]["survivors_only"]
        rows += block.values()
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# -- markdown -----------------------------------------------------------------------------------------------------

def _cell(row) -> str:
    if row["n"] == 0:
        return "– (n=0)"
    sd = f" ± {fmt(row['sd'], 3)}" if row["n"] > 1 else ""
    return f"{fmt(row['mean'])}{sd} (n={row['n']}){' †' if row['survivors_only'] else ''}"


def reading_guide(table: pd.DataFrame, include_unfinished: bool) -> list[str]:
    n_pairs = table.loc[table["test"] == st.PAIRED, "n_compared"]
    small = int(n_pairs.min()) if len(n_pairs) else None
    lines = [
        "## How to read this report", "",
        "- **Cells**: mean ± sd over seeds; n = runs averaged (each run's number is computed first, then averaged). "
        "Only finished runs are averaged" + (" (here also unfinished ones, with their latest records)."
                                            if include_unfinished else "; unfinished runs are counted, not averaged."),
        "- **Divergence is an outcome**: diverged runs are counted, never averaged; divergence rate = diverged / "
        "(done + diverged), compared between models with Fisher's exact test. **†** marks a mean (or a comparison) "
        "over the survivors of a model and η at which some runs diverged: it describes the runs that survived, not "
        "the model.",
        "- **Comparisons** (Δ = b − a): seed s gives both models the same training subset and batch order, so runs "
        "are paired by (seed, η, every other option). Test: paired t-test on the per-seed differences "
        "(`scipy.stats.ttest_rel`); 95% CI: t-interval of the mean difference; effect size **d_z** = mean / sd of "
        "the differences (not a between-group d). Welch's t-test (unpaired, effect Hedges' g) only where runs have "
        "no partner, and the test column says so.",
        f"- **Wilcoxon** signed-rank p (raw) is given from {st.WILCOXON_MIN_N} pairs: with fewer its exact two-sided "
        "p cannot go below 2/2ⁿ ≥ 0.0625. "
        f"A BCa bootstrap interval is given from {st.BOOTSTRAP_MIN_N} pairs only.",
        "- **Multiplicity**: p (Holm) adjusts the t-test p-values across the metrics of one comparison (Holm's "
        "step-down method, family-wise error rate, valid for correlated metrics). A difference is called significant "
        f"only where p (Holm) < {ALPHA:g}.",
    ]
    if small is not None and small < st.BAND_MIN_N:
        from scipy import stats
        t = stats.t.ppf(0.975, small - 1)
        lines.append(f"- **Few seeds** (n = {small} pairs): the 95% interval is ± {t:.2f} standard errors "
                     f"(t with {small - 1} degrees of freedom), so only large, consistent effects are detected; a "
                     "non-significant Δ here is not evidence that the models agree, and its interval says how "
                     "large a difference the data still allow.")
    return lines


def _runs_section(div: pd.DataFrame) -> list[str]:
    body = [[r["model"], f"{r['lr']:g}", str(r["runs"]), str(r["done"]), str(r["diverged"]), str(r["unfinished"]),
             f"{r['diverged']}/{r['done'] + r['diverged']}" + (f" ({r['divergence_rate']:.0%})"
                                                               if r["done"] + r["diverged"] else ""),
             f"{fmt_p(r['p_fisher'])} (vs {r['compared_to']})" if isinstance(r["compared_to"], str) else ""]
            for _, r in div.sort_values("lr", kind="stable").iterrows()]
    return ["## Runs and divergence", ""] + md_table(
        ["model", "η", "runs", "done", "diverged", "unfinished", "divergence rate", "Fisher's exact p"], body)


def _divergence_line(div: pd.DataFrame, a: str, b: str, lr: float) -> str:
    at = div[div["lr"] == lr].set_index("model")
    if a not in at.index or b not in at.index:
        return ""
    ra, rb = at.loc[a], at.loc[b]
    return (f"Divergence: {a} {ra['diverged']}/{ra['done'] + ra['diverged']}, {b} {rb['diverged']}/"
            f"{rb['done'] + rb['diverged']} (Fisher's exact p = {fmt_p(rb['p_fisher'])}).")


def _comparison_section(at_lr: pd.DataFrame, div: pd.DataFrame, a: str, b: str, lr: float) -> list[str]:
    rows = at_lr[(at_lr["model"] == b) & (at_lr["compared_to"] == a)]
    done = rows[rows["test"].isin([st.PAIRED, st.WELCH])]
    lines = ["", f"### {b} − {a}", "", _divergence_line(div, a, b, lr), ""]
    if done.empty:
        n = at_lr[at_lr["model"].isin([a, b])].groupby("model")["n"].max()
        return lines + [f"No comparison at η = {lr:g}: fewer than 2 averaged runs "
                        f"({', '.join(f'{m}: {k}' for m, k in n.items())})."]
    tests = sorted(set(done["test"]))
    n = sorted(set(done["n_compared"].astype(int)))
    lines.append(f"Test: {', '.join(tests)}; n = {'/'.join(map(str, n))}"
                 f"{' pairs' if tests == [st.PAIRED] else ''}; p (Holm) over the {done['p'].notna().sum()} metrics "
                 "with a p-value." + (" † survivors only: some runs diverged." if rows["survivors_only"].any() else ""))
    lines.append("")
    boot = rows["boot_low"].notna().any()
    header = ["metric", "Δ", "95% CI (t)", *(["95% CI (bootstrap)"] if boot else []), "effect", "test (n)", "p",
              "p (Holm)", f"Holm < {ALPHA:g}", "Wilcoxon p"]
    body = []
    for _, r in rows.iterrows():
        if r["test"] not in (st.PAIRED, st.WELCH):
            body.append([r["label"], "–", "–", *(["–"] if boot else []), "–", f"none ({r['note']})", "–", "–", "–",
                         "–"])
            continue
        effect = "–" if math.isnan(r["effect"]) else f"{r['effect_kind']} = {fmt(r['effect'], 3)}"
        sig = "–" if math.isnan(r["p_holm"]) else ("yes" if r["p_holm"] < ALPHA else "no")
        test = f"{r['test']} ({int(r['n_compared'])})" + (f"; {r['note']}" if r["note"] else "")
        body.append([r["label"] + (" †" if r["survivors_only"] else ""), fmt(r["diff"]),
                     f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                     *([f"[{fmt(r['boot_low'])}, {fmt(r['boot_high'])}]"] if boot else []), effect, test,
                     fmt_p(r["p"]), fmt_p(r["p_holm"]), sig, fmt_p(r["p_wilcoxon"])])
    return lines + md_table(header, body)


def render_markdown(results_dir, table: pd.DataFrame, runs: pd.DataFrame, div: pd.DataFrame,
                    include_unfinished: bool) -> str:
    name = Path(results_dir).resolve().name
    counts = runs["status"].value_counts()
    status_line = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "diverged", "unfinished"))
    modes = table.drop_duplicates("metric")
    lines = [f"# Smoothness report: {name}", "", f"Study folder `{name}`: {len(runs)} runs: {status_line}.", ""]
    variants = sorted(set(runs["variant"]) - {""})
    if variants:
        lines += ["This folder holds several configurations: runs are averaged only when they differ in nothing but "
                  "the seed, so each model is split by the options that differ (" + "; ".join(variants) + ").", ""]
    lines += ["BatchNorm mode of each metric (from the records): "
              + "; ".join(f"{r['metric']}: {r['bn_mode']}" for _, r in modes.iterrows()) + ".", ""]
    lines += reading_guide(table, include_unfinished) + [""] + _runs_section(div)
    for lr, at_lr in table.groupby("lr", sort=True):
        models = list(dict.fromkeys(at_lr["model"]))
        body = []
        for metric, g in at_lr.groupby("metric", sort=False):
            by_model = g.set_index("model")
            body.append([g["label"].iloc[0], g["bn_mode"].iloc[0], *(_cell(by_model.loc[m]) for m in models)])
        lines += ["", f"## η = {lr:g}", "", "### Mean ± sd over seeds", ""]
        lines += md_table(["metric", "BN mode", *models], body)
        comps = at_lr.dropna(subset=["compared_to"]).drop_duplicates(["model", "compared_to"])
        for _, c in comps.iterrows():
            lines += _comparison_section(at_lr, div, c["compared_to"], c["model"], lr)
    flagged = runs[~averaged(runs["status"], include_unfinished)]
    if len(flagged):
        lines += ["", "## Runs not averaged", ""]
        for _, r in flagged.iterrows():
            where = (f"diverged at step {r['diverged_step']} (epoch {r['diverged_epoch']})"
                     if r["status"] == "diverged" else f"unfinished, {r['n_records']} records so far")
            lines.append(f"- `{r['run']}` ({r['model']}, η={r['lr']:g}, seed {r['seed']}): {where}")
    return "\n".join(lines) + "\n"


def write_report(results_dir, out_dir=None, compare=None, include_unfinished: bool = False) -> Path:
    """Write report.md and report.csv (the ``summary_table``) to ``out_dir`` (default: results_dir)."""
    study = read_study(results_dir)  # raises AnalysisError before anything is written
    df, runs = records_frame(study), runs_frame(study)
    if df.empty:
        raise AnalysisError(f"{results_dir}: no run has any records yet; nothing to report")
    table = summary_table(df, compare=compare, include_unfinished=include_unfinished)
    div = divergence_table(runs, compare=compare)
    out_dir = Path(results_dir) if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.csv", table.to_csv(index=False))
    md = out_dir / "report.md"
    text = render_markdown(results_dir, table, runs, div, include_unfinished)
    for feature in list(FEATURES.values()):  # each feature's own section, in registration order
        if feature.report is not None:
            text += "\n".join(resolve(feature.report)(study, include_unfinished))
    atomic_write_text(md, text)
    return md

