"""``--executor``'s click type: the registry's names, read when the command line is parsed or its help shown, so an
executor registered after the CLI was imported is a choice too."""
from __future__ import annotations

import click

from experiments.executors.base import EXECUTORS


class ExecutorChoice(click.Choice):
    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self):
        return tuple(EXECUTORS)

    @choices.setter
    def choices(self, value) -> None:   # click.Choice.__init__ assigns it; the registry is the source
        pass
