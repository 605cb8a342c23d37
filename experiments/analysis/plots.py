"""The figures of a study: one registry of figure writers, and ``plot_study``, which draws every one that applies.

A figure writer is a name, a test of the loaded records (does this study call for the figure?) and the function that
draws it; ``plot_study`` saves what it draws as ``figures/<name>.png`` and ``.pdf`` and, for a writer with a
``table``, writes ``<name>.md`` next to the study. To add a figure: write its drawing function (``figures.py`` or a
module of its own) and register it here, or, from outside the package, with ``register_figure``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import pandas as pd
from matplotlib.figure import Figure

from experiments.atomic import atomic_write_text
from experiments.analysis.eos_figures import eos_figure, eos_markdown, eos_table, has_stepwise_sharpness
from experiments.analysis.figures import (SMOOTH, has_pass_sharpness, lr_sweep, santurkar_fig4, save_figure, seed_homework, several_lrs,
                      sharpness)
from experiments.analysis.load import AnalysisError, read_study, records_frame, runs_frame


@dataclass(frozen=True)
class FigureWriter:
    """One figure of ``plot_study``.

    ``applies(df, runs)``: whether the study's records call for the figure (``df``, ``runs``: ``load.records_frame``
    and ``load.runs_frame``). ``draw(df, runs, smooth=, include_unfinished=)``: the Figure, saved as
    ``figures/<name>.png`` and ``.pdf``. ``table(df, runs)``, if given: markdown written as ``<name>.md`` in the
    study's directory."""
    name: str
    applies: Callable[[pd.DataFrame, pd.DataFrame], bool]
    draw: Callable[..., Figure]
    table: Optional[Callable[[pd.DataFrame, pd.DataFrame], str]] = None


def always(df: pd.DataFrame, runs: pd.DataFrame) -> bool:
    """Every study gets the figure (a panel without records says so)."""
    return True


#: every figure ``plot_study`` considers, in the order it draws them
FIGURES: Dict[str, FigureWriter] = {w.name: w for w in (
    FigureWriter("santurkar_fig4", always, lambda df, runs, smooth, include_unfinished:
                 santurkar_fig4(df, runs, smooth=smooth, include_unfinished=include_unfinished)),
    FigureWriter("sharpness", has_pass_sharpness, lambda df, runs, smooth, include_unfinished:
                 sharpness(df, runs, include_unfinished=include_unfinished)),
    FigureWriter("seed_homework", always, lambda df, runs, smooth, include_unfinished:
                 seed_homework(df, runs, include_unfinished=include_unfinished)),
    FigureWriter("lr_sweep", several_lrs, lambda df, runs, smooth, include_unfinished:
                 lr_sweep(df, runs, include_unfinished=include_unfinished)),
    FigureWriter("eos", has_stepwise_sharpness, lambda df, runs, smooth, include_unfinished: eos_figure(df, runs),
                 table=lambda df, runs: eos_markdown(eos_table(df, runs))),
)}


def register_figure(writer: FigureWriter) -> FigureWriter:
    """Add a figure to every later ``plot_study`` (drawn after the built-in ones). Returns ``writer``."""
    if writer.name in FIGURES:
        raise ValueError(f"a figure named {writer.name!r} is already registered; choose another name (registered: "
                         f"{', '.join(FIGURES)})")
    FIGURES[writer.name] = writer
    return writer


def plot_study(results_dir, out_dir=None, smooth: int = SMOOTH, include_unfinished: bool = False) -> list[Path]:
    """Draw every registered figure that applies to a study; default ``out_dir`` is ``results_dir/figures``.
    Returns the paths written, figure by figure (png, pdf, then its table if any).

    ``include_unfinished`` admits unfinished runs to the bold means, as the report's option of the same name does.
    """
    study = read_study(results_dir)  # raises AnalysisError before anything is written
    df, runs = records_frame(study), runs_frame(study)
    if df.empty:
        raise AnalysisError(f"{results_dir}: no run has any records yet; nothing to plot")
    out_dir = Path(results_dir) / "figures" if out_dir is None else Path(out_dir)
    paths = []
    for writer in list(FIGURES.values()):
        if not writer.applies(df, runs):
            continue
        paths += save_figure(writer.draw(df, runs, smooth=smooth, include_unfinished=include_unfinished), out_dir,
                             writer.name)
        if writer.table is not None:
            table = Path(results_dir) / f"{writer.name}.md"
            atomic_write_text(table, writer.table(df, runs))
            paths.append(table)
    return paths
