"""mkdocs hooks of the site (mkdocs.yml: hooks). The docstrings and the click help write math with brackets
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
