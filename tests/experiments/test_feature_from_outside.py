"""A feature defined outside the package: one module (here written into a temporary folder on PYTHONPATH) and one
registration, named by ``$SMOOTHNESS_LAB_FEATURES``. Through the real command line (a subprocess, as a user runs it)
its option and its command appear in ``--help``, a run writes and validates its records (in the process executor's
workers too), ``plot`` draws its figure, ``report`` shows its metric and its section, ``status`` lists the run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MODULE = '''
"""The norm of the minibatch gradient every --gradnorm-every steps: a feature outside smoothness-lab."""
import click

from experiments.features import Feature, Measurement, Metric, Option, Record, register
from experiments.features.base import every


def _hooks(ctx):
    import torch
    from experiments.loop import Hook

    def measure(state):
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ctx.model.parameters() if p.grad is not None))
        return ctx.at(state.step, {"kind": "gradnorm", "bn_mode": "batch", "grad_norm": float(norm)})

    n = ctx.cfg.gradnorm_every
    return (Hook("gradnorm", n, "gradient", measure, what="a gradient norm"),) if n else ()


def _figure(df, runs, smooth, include_unfinished):
    from matplotlib.figure import Figure
    rows = df[df["kind"] == "gradnorm"]
    fig = Figure()
    fig.subplots().plot(rows["step"], rows["value"], "o")
    return fig


def _applies(df, runs):
    return (df["kind"] == "gradnorm").any()


def _section(study, include_unfinished):
    return ["", "## Gradient norms", "", f"{len(study)} runs measured the gradient norm.", ""]


@click.command("gradnorm-summary")
@click.argument("results_dir")
def summary(results_dir):
    """Print how many gradnorm records each run holds."""
    click.echo("gradnorm summary of " + results_dir)


def _writer():
    from experiments.analysis import FigureWriter
    return FigureWriter("gradnorm", _applies, _figure)


class _Lazy:   # the figure writer is built when plot asks for it (matplotlib stays out of --help)
    name = "gradnorm"

    def applies(self, df, runs):
        return _applies(df, runs)

    def write(self, context):
        return _writer().write(context)


FEATURE = register(Feature(
    "gradnorm", "minibatch gradient norm",
    measurement=Measurement(
        name="gradnorm", schedule="every --gradnorm-every steps (0 = off)",
        options=(Option("gradnorm_every", int, 0, "minibatch gradient norm every N steps (0 = off)", check=every),),
        records=(Record("gradnorm", numbers=("grad_norm",)),), hooks=_hooks,
        metrics=(Metric("final_grad_norm", "final minibatch gradient norm", "gradnorm", "grad_norm", "last"),)),
    figures=(_Lazy(),), report=_section, commands=(summary,)))
'''

TINY = ["--dataset", "synthetic", "--subset", "0.08", "--epochs", "2", "--probe-every", "0",
        "--no-pass-sharpness", "--local-smoothness-samples", "64", "--device", "cpu"]


@pytest.fixture
def cli(tmp_path):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "gradnorm_feature.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SMOOTHNESS_LAB_FEATURES": "gradnorm_feature", "OMP_NUM_THREADS": "1"}

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "experiments.cli", *args], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr
    return run


@pytest.mark.slow
def test_a_feature_module_from_outside_reaches_every_command(cli, tmp_path):
    helps = cli("--help")
    assert "gradnorm-summary" in helps
    assert "--gradnorm-every" in cli("train", "--help")
    assert "gradnorm summary of x" in cli("gradnorm-summary", "x")

    study = tmp_path / "results" / "gn"
    cli("-q", "sweep", *TINY, "--models", "fc-tanh", "--lrs", "0.05", "--seeds", "0-1", "--executor", "process",
        "--workers", "2", "--results-dir", str(tmp_path / "results"), "--name", "gn", "--no-figures",
        "--gradnorm-every", "2")
    runs = sorted(p for p in study.iterdir() if (p / "config.json").exists())
    assert len(runs) == 2
    for run in runs:   # written by the worker processes, which loaded the feature too
        kinds = [json.loads(line)["kind"] for line in (run / "records.jsonl").read_text().splitlines()]
        assert kinds.count("gradnorm") == 5
        assert json.loads((run / "config.json").read_text())["gradnorm_every"] == 2

    plotted = cli("plot", str(study))
    assert (study / "figures" / "gradnorm.png").stat().st_size > 0 and "gradnorm.png" in plotted
    cli("-q", "report", str(study))
    report = (study / "report.md").read_text()
    assert "final minibatch gradient norm" in report and "2 runs measured the gradient norm." in report
    status = cli("status", str(study))
    assert all(run.name in status for run in runs)


def test_a_feature_module_that_cannot_be_imported_is_one_line(tmp_path):
    env = {**os.environ, "SMOOTHNESS_LAB_FEATURES": "no_such_feature_module"}
    out = subprocess.run([sys.executable, "-m", "experiments.cli", "--help"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "no_such_feature_module" in out.stderr and "PYTHONPATH" in out.stderr and "Traceback" not in out.stderr
