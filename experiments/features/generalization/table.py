"""A study's runs as the table the sharpness-vs-generalisation analysis takes (``generalization``): one row per
finished run with its hyper-parameter axes, whether it reached the target training loss, the generalisation gap at
its last evaluation and the measures of its last ``generalization`` record; then the report and figures.

The gap is Jiang et al.'s: test error − training error (errors = 1 − accuracy, the training error on the whole
training subset), at the run's last evaluation, which is where a run with a target stopped.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.analysis.plots import StudyWriter, has_kind
from experiments.features.generalization.compute import FIELDS
from experiments.analysis.errors import AnalysisError
from experiments.features.generalization.figures import write_figures
from experiments.features.generalization.report import analyse, write_report
from experiments.analysis.load import read_study
from experiments.analysis.pairing import variant_labels

AXES = ("lr", "batch_size", "weight_decay", "bn")
GAP_LABEL = "test error − training error"


def _last(records: list, kind: str) -> dict | None:
    return next((r for r in reversed(records) if r.get("kind") == kind), None)


def _network(config: dict) -> str:
    """The network apart from its normalisation (the BN axis): ``bn-convnet`` and ``convnet`` are one network."""
    from experiments.models import MODELS
    model = config["model"]
    plain = model.removeprefix("bn-")
    return plain if model in MODELS and plain in MODELS else model


def _variants(configs: list) -> list[str]:
    """What sets runs apart besides the study's axes and the seed (``pairing.variant_labels``), the network included:
    runs of different variants are never pooled into one τ."""
    return variant_labels([{**{k: v for k, v in c.items() if k not in ("batch_size", "weight_decay")},
                            "network": _network(c)} for c in configs])


def study_table(results_dir, notify=None) -> pd.DataFrame:
    """One row per finished run with a ``generalization`` record (module docstring); unfinished and diverged runs
    are left out (named in the AnalysisError when nothing is left). ``bn``: whether the network normalises with
    batch statistics (`experiments.study.batch_normalised`: from the network, not its name); ``variant``: what sets
    the run apart besides the axes and the seed."""
    from experiments.study import RebuildError, batch_normalised
    rows, skipped = [], []
    runs = read_study(results_dir, notify)
    for run, variant in zip(runs, _variants([r.config for r in runs])):
        c, gen, ev = run.config, _last(run.records, "generalization"), _last(run.records, "eval")
        if run.status != "done" or gen is None or ev is None:
            skipped.append(f"{run.path.name} ({run.status}{', no generalization record' if gen is None else ''})")
            continue
        try:
            bn = batch_normalised(c, run.path)
        except RebuildError as exc:
            raise AnalysisError(f"{run.path.name}: its BatchNorm axis needs its network: {exc}") from None
        target = _last(run.records, "target")
        rows.append({"run": run.path.name, "model": c["model"], "bn": bn, "variant": variant,
                     "lr": float(c["lr"]), "batch_size": int(c["batch_size"]),
                     "weight_decay": float(c.get("weight_decay", 0.0)), "seed": int(c["seed"]),
                     "reached": bool(target["reached"]) if target is not None else True,
                     "gap": ev["train_accuracy"] - ev["test_accuracy"],
                     "loss_gap": ev["test_loss"] - ev["train_loss"], "train_loss": ev["train_loss"],
                     "test_accuracy": ev["test_accuracy"], "step": gen["step"],
                     **{f: gen.get(f) for f in FIELDS}})
    if not rows:
        raise AnalysisError(f"{results_dir}: no finished run with a generalization record (run the study with "
                            f"--generalization-every, e.g. the 'generalization' preset); left out: "
                            f"{', '.join(skipped) or 'nothing'}")
    return pd.DataFrame(rows).sort_values(["model", "lr", "batch_size", "weight_decay", "seed"], ignore_index=True)


def write_generalization(results_dir, out_dir=None, n_resamples: int = 2000, notify=None) -> list[Path]:
    """generalization.md / .csv in the study folder and the two figures in ``out_dir`` (default its figures/).
    A folder holding several variants (runs that differ in more than the axes and the seed: another network, other
    epochs) gets one analysis per variant, in ``generalization/<variant>/`` and ``<out_dir>/generalization/
    <variant>/``; none pools them."""
    results_dir = Path(results_dir)
    df = study_table(results_dir, notify)
    out_dir = results_dir / "figures" if out_dir is None else Path(out_dir)
    variants = list(dict.fromkeys(df["variant"]))
    if len(variants) == 1:
        return _analyse(df, results_dir, results_dir, out_dir, n_resamples)
    if notify is not None:
        notify(f"{len(variants)} variants analysed apart (never pooled): {'; '.join(variants)}")
    paths = []
    for variant in variants:
        name = _slug(variant)
        paths += _analyse(df[df["variant"] == variant].reset_index(drop=True), results_dir,
                          results_dir / "generalization" / name, out_dir / "generalization" / name, n_resamples,
                          f" (variant {variant})")
    return paths


def _slug(variant: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-_" else "_" for ch in variant.replace(", ", "_"))[:120]


def _analyse(df, results_dir: Path, report_dir: Path, figure_dir: Path, n_resamples: int, of: str = "") -> list:
    axes = [a for a in AXES if df[a].nunique() > 1]
    if not axes:
        raise AnalysisError(f"{results_dir}{of}: the runs do not vary any of {', '.join(AXES)}; Kendall's τ across "
                            f"hyper-parameters needs a grid (e.g. the 'generalization' preset)")
    measures = [f for f in FIELDS if df[f].notna().any()]
    lr = "lr" if "lr" in axes else None
    results = analyse(df, measures, axes, lr=lr, n_resamples=n_resamples)
    report_dir.mkdir(parents=True, exist_ok=True)
    report = write_report(df, measures, axes, report_dir, gap_label=GAP_LABEL, lr=lr, n_resamples=n_resamples,
                          results=results)
    figures = write_figures(df, results, figure_dir, gap_label=GAP_LABEL)
    return [report, report_dir / "generalization.csv", *figures]


def _write(results_dir, out_dir=None, notify=None) -> list[Path]:
    return write_generalization(results_dir, out_dir, notify=notify)


GENERALIZATION = StudyWriter("generalization", has_kind("generalization"), _write)
