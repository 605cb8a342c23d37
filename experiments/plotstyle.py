"""The one figure style of the project: seaborn's paper context and whitegrid, applied per figure (no global
rcParams change). Seaborn is imported when a figure is drawn, so importing this costs nothing."""
from __future__ import annotations

import functools


def styled(fn):
    """Draw the whole figure made by ``fn`` inside the project's style."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import seaborn as sns
        with sns.plotting_context("paper", font_scale=1.3), sns.axes_style("whitegrid"):
            return fn(*args, **kwargs)
    return wrapper
