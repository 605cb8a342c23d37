"""Markdown cells and tables, shared by the report and the features' paired-test tables."""
from __future__ import annotations

import math


def fmt(x, digits=4) -> str:
    """A number to ``digits`` significant digits; "–" for a missing one (None or NaN)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def fmt_p(x) -> str:
    """A p-value: three decimals, two significant digits below 0.001; "–" for a missing one."""
    return "–" if x is None or math.isnan(x) else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def mean_sd(values, missing: str = "–") -> str:
    """Mean ± sd (ddof 1) of the non-missing values, the mean alone for one value, ``missing`` for none."""
    v = values.dropna().astype(float)
    if v.empty:
        return missing
    return f"{v.mean():.4g} ± {v.std(ddof=1):.2g}" if len(v) > 1 else f"{v.iloc[0]:.4g}"


def families_markdown(header: list[str], families, note: str) -> str:
    """Sections of paired-test tables, one per family ``(heading, rows)`` that has rows, after ``note``; "" when no
    family has any."""
    out = []
    for heading, rows in families:
        if rows:
            out += [f"## {heading}", "", *md_table(header, rows), ""]
    return "\n".join([note, ""] + out) if out else ""
