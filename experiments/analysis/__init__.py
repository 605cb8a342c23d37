"""Analysis of a study's results directory: long-form tables, figures and the summary report.

    df = load("results/fashion-mnist-bn")          # one row per numeric field per record
    runs = load_runs("results/fashion-mnist-bn")   # one row per run, with status
    plot_study("results/fashion-mnist-bn")         # figures/*.png + *.pdf
    write_report("results/fashion-mnist-bn")       # report.md + report.csv
"""
from .figures import lr_sweep, plot_study, santurkar_fig4, save_figure, seed_homework, sharpness
from .load import AnalysisError, load, load_runs, select
from .metrics import METRICS, run_metrics
from .report import summary_table, write_report

__all__ = [
    "AnalysisError", "load", "load_runs", "select", "METRICS", "run_metrics", "plot_study", "save_figure",
    "santurkar_fig4", "sharpness", "seed_homework", "lr_sweep", "summary_table", "write_report",
]
