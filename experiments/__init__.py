"""smoothness-lab's application package. ``experiments.Tracker`` (experiments/tracker.py) tracks a training loop of
one's own; it is imported on first use, so that the CLI starts without it."""

__all__ = ["Tracker"]


def __getattr__(name):
    if name == "Tracker":
        from experiments.tracker import Tracker
        return Tracker
    raise AttributeError(f"module 'experiments' has no attribute {name!r}")
