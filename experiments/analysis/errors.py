"""The one error of the analysis: raised by every reader and table of ``experiments.analysis``."""


class AnalysisError(RuntimeError):
    """The results directory cannot be analysed; the message says what was wrong and what was expected."""
