"""Analysis of a study's results directory: long-form tables, figures and the summary report.

    df = load("results/fashion-mnist-bn")          # one row per numeric field per record
    runs = load_runs("results/fashion-mnist-bn")   # one row per run, with status
    plot_study("results/fashion-mnist-bn")         # figures/*.png + *.pdf: every feature's figure that applies
    write_report("results/fashion-mnist-bn")       # report.md + report.csv
    run = rebuild("results/fashion-mnist-bn/<run-id>", "final")   # model at its final weights, loss, data, config

Runs are averaged only when they differ in nothing but the seed, and runs of two models are compared paired by seed
(``pairing``); the statistics are scipy's (``stats``).
"""
from experiments.analysis.figures import lr_sweep, save_figure, seed_homework
from experiments.analysis.load import AnalysisError, load, load_runs, select
from experiments.analysis.metrics import METRICS, averaged, run_metrics
from experiments.analysis.pairing import comparison_pairs, pair_up
from experiments.analysis.plots import FigureWriter, StudyWriter, figure_writers, plot_study, register_figure
from experiments.analysis.report import divergence_table, summary_table, write_report
from experiments.study import rebuild

__all__ = [
    "AnalysisError", "load", "load_runs", "select", "METRICS", "averaged", "run_metrics", "comparison_pairs",
    "pair_up", "plot_study", "FigureWriter", "StudyWriter", "figure_writers", "register_figure", "save_figure",
    "seed_homework", "lr_sweep", "summary_table", "divergence_table", "write_report", "rebuild",
]
