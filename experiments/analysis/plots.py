"""`plot_study`: every figure of every registered feature (``experiments.features``) that applies to a study.

A feature lists its figure writers; each has ``applies(df, runs)`` (do the study's records call for it?) and
``write(context) -> paths``. `FigureWriter` draws one Figure from the long-form records and saves it as
``figures/<name>.png`` and ``.pdf`` (and, with a ``table``, ``<name>.md`` in the study's folder); `StudyWriter`
wraps a feature's own writer of several figures and tables (the spectrum, per-layer and generalisation studies).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import pandas as pd
from matplotlib.figure import Figure

from experiments.analysis.errors import AnalysisError
from experiments.analysis.figures import SMOOTH, save_figure
from experiments.analysis.load import read_study, records_frame, runs_frame
from experiments.atomic import atomic_write_text
from experiments.features import FEATURES, Feature, register, resolve


@dataclass(frozen=True)
class PlotContext:
    """What a writer gets: the study's records (``df``) and runs, where the study is and where figures go."""
    results_dir: Path
    out_dir: Path
    df: pd.DataFrame
    runs: pd.DataFrame
    smooth: int = SMOOTH
    include_unfinished: bool = False
    notify: Optional[Callable[[str], None]] = None


@dataclass(frozen=True)
class FigureWriter:
    """One figure. ``draw(df, runs, smooth=, include_unfinished=)`` returns the Figure (or None: nothing to draw);
    ``table(df, runs)``, if given, returns markdown written as ``<name>.md`` in the study's folder."""
    name: str
    applies: Callable[[pd.DataFrame, pd.DataFrame], bool]
    draw: Callable[..., Optional[Figure]]
    table: Optional[Callable[[pd.DataFrame, pd.DataFrame], str]] = None

    def write(self, c: PlotContext) -> List[Path]:
        fig = self.draw(c.df, c.runs, smooth=c.smooth, include_unfinished=c.include_unfinished)
        paths = [] if fig is None else save_figure(fig, c.out_dir, self.name)
        if self.table is not None:
            table = Path(c.results_dir) / f"{self.name}.md"
            atomic_write_text(table, self.table(c.df, c.runs))
            paths.append(table)
        return paths


@dataclass(frozen=True)
class StudyWriter:
    """A feature's writer of several figures and tables: ``write(results_dir, out_dir, notify) -> paths``."""
    name: str
    applies: Callable[[pd.DataFrame, pd.DataFrame], bool]
    writer: Callable[..., List[Path]]

    def write(self, c: PlotContext) -> List[Path]:
        return list(self.writer(c.results_dir, c.out_dir, notify=c.notify))


def always(df: pd.DataFrame, runs: pd.DataFrame) -> bool:
    """Every study gets the figure (a panel without records says so)."""
    return True


def has_kind(kind: str) -> Callable[[pd.DataFrame, pd.DataFrame], bool]:
    """``applies``: some run wrote a record of ``kind``."""
    return lambda df, runs: bool(len(df)) and (df["kind"] == kind).any()


def figure_writers() -> list:
    """Every registered feature's figure writers, in registration order."""
    return [resolve(ref) for f in list(FEATURES.values()) for ref in f.figures]


def register_figure(writer) -> Feature:
    """Add one figure writer to every later `plot_study`, as a feature of its own (the one way to plug in a figure:
    ``experiments.features.register``). Returns the feature."""
    taken = [w.name for w in figure_writers()]
    if writer.name in taken:
        raise ValueError(f"a figure named {writer.name!r} is already registered; choose another name (registered: "
                         f"{', '.join(taken)})")
    return register(Feature(f"figure:{writer.name}", figures=(writer,)))


def plot_study(results_dir, out_dir=None, smooth: int = SMOOTH, include_unfinished: bool = False,
               notify: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Draw every registered figure that applies to a study; default ``out_dir`` is ``results_dir/figures``.
    Returns the paths written, writer by writer.

    ``include_unfinished`` admits unfinished runs to the bold means, as the report's option of the same name does.
    """
    study = read_study(results_dir, notify)  # raises AnalysisError before anything is written
    df, runs = records_frame(study), runs_frame(study)
    if df.empty:
        raise AnalysisError(f"{results_dir}: no run has any records yet; nothing to plot")
    out_dir = Path(results_dir) / "figures" if out_dir is None else Path(out_dir)
    context = PlotContext(Path(results_dir), out_dir, df, runs, smooth, include_unfinished, notify)
    paths = []
    for writer in figure_writers():
        if not writer.applies(df, runs):
            continue
        try:
            paths += writer.write(context)
        except AnalysisError as exc:
            if isinstance(writer, FigureWriter):
                raise
            # a feature's own study (spectrum, per-layer, generalisation) that cannot be drawn from these runs does
            # not stop the other figures; its own command says the same as an error
            if notify is not None:
                notify(f"{writer.name}: not drawn: {exc}")
    return paths
