"""mkdocs hooks of the site (mkdocs.yml: hooks).

Pages generated from the code: ``<!-- presets -->`` becomes the table of `experiments.presets.PRESETS`.

The docstrings and the click help write math with brackets
(``coords[0][i]``, ``[default: ...]``), which Markdown reads as reference links and mkdocs-autorefs then reports as
missing cross-references: a warning, so an error under --strict. Those are dropped here; a missing target that names
an object of this project (``smoothness.…``, ``experiments.…``) is still an error."""
import logging
import re

_MISSING = re.compile(r"Could not find cross-reference target '([^']*)'")


class _MathBrackets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        found = _MISSING.search(record.getMessage())
        return found is None or found.group(1).startswith(("smoothness", "experiments"))


def on_config(config):
    for handler in logging.getLogger("mkdocs").handlers:   # the console and the --strict counter
        if not any(isinstance(f, _MathBrackets) for f in handler.filters):
            handler.addFilter(_MathBrackets())


PRESETS_MARKER = "<!-- presets -->"


def _cell(text) -> str:
    return str(text).replace("|", "\\|")   # a table cell cannot hold a bare |


def presets_table() -> str:
    """One row per preset study: its name, runs, models, learning rates, seeds, passes, dataset and description."""
    from dataclasses import fields

    from experiments.presets import DESCRIPTIONS, PRESETS
    from experiments.config import RunConfig
    default = RunConfig()
    rows = ["| preset | runs | models | η | seeds | passes | dataset | options away from the defaults | what it is |",
            "|---|---|---|---|---|---|---|---|---|"]
    shown = {"model", "norm", "lr", "seed", "epochs", "dataset", "study", "later_options"}
    for name, study in PRESETS.items():
        base = study.base
        changed = ", ".join(f"`{f.name}={getattr(base, f.name)}`" for f in fields(base)
                            if f.name not in shown and getattr(base, f.name) != getattr(default, f.name))
        s = list(study.seeds)
        seeds = f"{s[0]}–{s[-1]}" if s == list(range(s[0], s[-1] + 1)) else ", ".join(map(str, s))
        rows.append(f"| `{name}` | {len(study.runs())} | {', '.join(study.models)} | "
                    f"{', '.join(f'{lr:g}' for lr in study.lrs)} | {seeds} | {base.epochs} | {base.dataset} | "
                    f"{_cell(changed) or '–'} | {_cell(DESCRIPTIONS[name])} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown, page, config, files):
    if PRESETS_MARKER in markdown:
        markdown = markdown.replace(PRESETS_MARKER, presets_table())
    return markdown
