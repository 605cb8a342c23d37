"""experiments.features.lambda_max.eos on hand-made records whose answers are known: crossing step, the fraction of
measurements within ±10% of the threshold, Adam's preconditioned sharpness against 38/η, and the figure."""
from __future__ import annotations

import json
import math

import matplotlib.colors as mcolors
import pandas as pd
import pytest

from experiments.analysis.plots import plot_study
from experiments.features.lambda_max.eos import eos_figure, eos_markdown, eos_table
from experiments.analysis.load import read_study, records_frame, runs_frame

EVERY = 10
#: the run id each hand-made run gets: its folder must be named after what its config hashes to (the study loader
#: leaves out a folder whose config describes another run)
RUN_IDS = {}


def _write_run(study, name, lr, sharpness, *, optimizer="sgd", status="done", preconditioned=None):
    """A full-batch run with a step record per step and a sharpness record every EVERY steps."""
    from experiments.config import RunConfig
    cfg = RunConfig(model="fc-tanh", seed=0, lr=lr, dataset="fashion-mnist", norm="none", optimizer=optimizer,
                    batch_size=0)
    RUN_IDS[name] = cfg.run_id
    d = study / cfg.run_id
    d.mkdir(parents=True)
    config = {"run_id": cfg.run_id, "model": "fc-tanh", "seed": 0, "lr": lr, "dataset": "fashion-mnist",
              "norm": "none", "optimizer": optimizer, "batch_size": 0}
    (d / "config.json").write_text(json.dumps(config))
    threshold = 38 / lr if optimizer == "adam" else 2 / lr
    records = []
    for i, value in enumerate(sharpness):
        step = i * EVERY
        for t in range(step, step + EVERY):
            records.append({"kind": "step", "step": t, "epoch": t, "bn_mode": "batch", "loss": 1.0 / (1 + t),
                            "accuracy": 0.5})
        rec = {"kind": "sharpness", "step": step, "epoch": step, "bn_mode": "batch", "sharpness": value,
               "sharpness_n_hvp": 7, "stability_threshold": threshold, "lr": lr}
        if preconditioned is not None:
            rec["preconditioned_sharpness"] = preconditioned[i]
        records.append(rec)
    if status == "diverged":
        records.append({"kind": "diverged", "step": len(sharpness) * EVERY, "epoch": 0, "bn_mode": "batch",
                        "loss": None, "reason": "test"})
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "done").write_text("")


@pytest.fixture
def study(tmp_path):
    s = tmp_path / "eos"
    # η = 0.05, threshold 40: crosses at the 4th measurement (step 30); after it 41, 39, 43, 50, 35:
    # ratios 1.025, 0.975, 1.075 inside ±10%, 1.25 and 0.875 outside -> 3/5
    _write_run(s, "gd-a", 0.05, [20, 30, 38, 41, 39, 43, 50, 35])
    # η = 0.02, threshold 100: never reaches it
    _write_run(s, "gd-b", 0.02, [20, 25, 31, 40])
    # Adam, η = 0.01: threshold 38/η = 3800 on λ(P⁻¹H); its raw sharpness (tiny here) is not what is compared
    _write_run(s, "adam", 0.01, [5, 5, 5, 5], optimizer="adam", preconditioned=[1000, 3900, 3700, 4400])
    return s


def _frames(study):
    runs = read_study(study)
    return records_frame(runs), runs_frame(runs)


def test_table_counts_crossing_and_band(study):
    table = eos_table(*_frames(study)).set_index("run")
    a = table.loc[RUN_IDS["gd-a"]]
    assert a.threshold == pytest.approx(40) and a.initial_sharpness == 20 and a.n_measurements == 8
    assert a.first_crossing_step == 30 and a.n_after_crossing == 5
    assert a.fraction_within_band == pytest.approx(3 / 5)
    assert a.median_ratio_after_crossing == pytest.approx(1.025) and a.max_ratio == pytest.approx(1.25)
    b = table.loc[RUN_IDS["gd-b"]]
    assert pd.isna(b.first_crossing_step)
    assert math.isnan(b.fraction_within_band) and b.n_after_crossing == 0 and b.max_ratio == pytest.approx(0.4)
    adam = table.loc[RUN_IDS["adam"]]
    assert adam.quantity == "preconditioned_sharpness" and adam.threshold == pytest.approx(3800)
    assert adam.first_crossing_step == 10 and adam.fraction_within_band == pytest.approx(2 / 3)  # 3900, 3700 in; 4400 out


def test_band_is_a_parameter(study):
    table = eos_table(*_frames(study), band=0.3).set_index("run")
    assert table.loc[RUN_IDS["gd-a"], "fraction_within_band"] == pytest.approx(1.0)


def test_markdown_lists_every_run(study):
    text = eos_markdown(eos_table(*_frames(study)))
    assert text.startswith("## Edge of stability")
    # the analysis labels runs of one folder that differ in an option by it (fc-tanh [optimizer=sgd])
    assert "| fc-tanh [optimizer=sgd] | 0.05 | 0 | 40 | 20 | 30 | 5 | 0.60 | 1.025 | 1.25 | done |" in text
    assert "| fc-tanh [optimizer=sgd] | 0.02 | 0 | 100 | 20 | never | 0 | – | – | 0.4 | done |" in text
    assert "| fc-tanh [optimizer=adam] (P⁻¹H) | 0.01 | 0 | 3800 |" in text


def test_figure_draws_loss_and_sharpness_with_each_threshold_in_its_colour(study):
    df, runs = _frames(study)
    fig = eos_figure(df, runs)
    axes = fig.axes[:4]  # 2 rows x 2 columns: one column per model label (the Adam run is its own variant)
    tops, bottoms = axes[:2], axes[2:]
    assert [a.get_title() for a in tops] == ["fc-tanh [optimizer=adam]", "fc-tanh [optimizer=sgd]"]
    assert all(a.get_yscale() == "log" and "loss" in a.get_ylabel() for a in tops)
    assert "P⁻¹H" in bottoms[0].get_ylabel() and bottoms[1].get_ylabel() == "sharpness λ_max(H)"
    drawn = {}
    for ax in bottoms:
        for ln in ax.get_lines():
            if ln.get_linestyle() == "--":
                drawn[round(float(ln.get_ydata()[0]), 6)] = mcolors.to_hex(ln.get_color())
    assert set(drawn) == {40.0, 100.0, 3800.0}
    curves = {mcolors.to_hex(ln.get_color()) for ax in bottoms for ln in ax.get_lines()
              if ln.get_linestyle() == "-"}
    assert curves == set(drawn.values()) and len(curves) == 3  # one colour per η, shared by curve and threshold


def test_plot_eos_writes_png_and_pdf_and_skips_studies_without_stepwise_sharpness(study, tmp_path):
    paths = [p for p in plot_study(study) if p.stem == "eos"]
    assert sorted(p.name for p in paths) == ["eos.md", "eos.pdf", "eos.png"] and all(p.stat().st_size > 0 for p in paths)
    from experiments.config import RunConfig
    run_id = RunConfig(model="convnet", seed=0, lr=0.04).run_id
    other = tmp_path / "sgd"
    d = other / run_id
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"run_id": run_id, "model": "convnet", "seed": 0, "lr": 0.04}))
    (d / "records.jsonl").write_text(json.dumps({"kind": "smoothness", "step": 0, "epoch": 0, "bn_mode": "batch",
                                                 "sharpness": 12.0}) + "\n")
    assert not [p for p in plot_study(other) if p.stem == "eos"] and eos_table(*_frames(other)).empty and eos_markdown(eos_table(*_frames(other))) == ""


def test_plot_draws_the_eos_figure_and_table_for_a_full_batch_study(study, tmp_path):
    """`smoothness-lab plot` is the one command: a study with step-wise sharpness gets eos.png/.pdf and eos.md,
    and no per-pass sharpness figure (its runs recorded none)."""
    from experiments.analysis.plots import plot_study
    out = tmp_path / "figs"
    paths = plot_study(study, out)
    names = {p.name for p in paths}
    assert {"eos.png", "eos.pdf", "eos.md"} <= names and "sharpness.png" not in names
    assert (study / "eos.md").read_text() == eos_markdown(eos_table(*_frames(study)))
    assert "| 3/5" in (study / "eos.md").read_text() or "0.60" in (study / "eos.md").read_text()


def test_sgd_sharpness_figure_carries_the_full_batch_caveat(tmp_path):
    """The per-pass sharpness of a minibatch-SGD study is drawn beside 2/η with the caveat that 2/η is full-batch
    GD's threshold (issue 13 §5)."""
    from fake_results import make_results

    from experiments.features.local_smoothness.figures import sharpness
    from experiments.analysis.load import load, load_runs
    fake = make_results(tmp_path, seeds=(0, 1))
    fig = sharpness(load(fake.path), load_runs(fake.path))
    title = fig._suptitle.get_text()
    assert "full-batch GD" in title and "minibatch" in title and "edge-of-stability" in title


@pytest.mark.slow
def test_edge_of_stability_preset_trains_on_real_data_and_plots(tmp_path):
    """The preset's own config (full-batch GD, fc-tanh, square loss, 5,000 real FashionMNIST images, sharpness on
    all of them in chunks every 20 steps, warm-started), shortened to 40 steps, then `plot`'s eos figure and table."""
    import dataclasses

    from experiments.analysis.plots import plot_study
    from experiments.presets import get_preset
    from experiments.training import train_run

    study = get_preset("edge-of-stability")
    cfg = dataclasses.replace(study.runs()[1], epochs=40, eval_every=20)
    assert (cfg.batch_size, cfg.loss, cfg.model, cfg.sharpness_samples) == (0, "mse", "fc-tanh", 0)
    out = train_run(cfg, tmp_path / "eos")
    recs = [json.loads(line) for line in (out.path / "records.jsonl").read_text().splitlines()]
    sharp = [r for r in recs if r["kind"] == "sharpness"]
    assert [r["step"] for r in sharp] == [0, 20] and all(r["samples"] == 5000 for r in sharp)
    assert all(r["stability_threshold"] == pytest.approx(2 / cfg.lr) for r in sharp)
    assert 10 < sharp[0]["sharpness"] < 2 / cfg.lr  # below the threshold at initialisation (about 38 here)
    steps = [r for r in recs if r["kind"] == "step"]
    assert len(steps) == 40 and steps[-1]["loss"] < steps[0]["loss"]
    names = {p.name for p in plot_study(tmp_path / "eos")}
    assert {"eos.png", "eos.pdf", "eos.md"} <= names
