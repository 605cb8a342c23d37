"""The Hessian spectrum along training (``--spectrum-every``), its records and ``smoothness-lab spectrum``.

Measurements are made small by monkeypatching ``experiments.features.spectrum.compute``'s constants (sample size, Lanczos steps, top
k): the code reads them at call time, and the serial executor runs in this process, so the patch reaches a whole
``smoothness-lab run`` as well. The figures are checked on a hand-made study whose spectra are known exactly, and on
a tiny real FashionMNIST study.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import smoothness
from experiments.features.spectrum import compute as spectrum
from experiments.features.spectrum import figures as spectrum_figures, stats as spectrum_stats
from experiments.features.spectrum.figures import spectrum_table
from experiments.cli import main
from experiments.config import RunConfig
from experiments.data import DataError, load_dataset
from experiments.models import build_model
from experiments.store import RunStore
from experiments.training import train_run

sys.path.insert(0, str(Path(__file__).parent))
from fake_results import make_results  # noqa: E402

STEMS = ("spectrum_density", "spectrum_bn_modes", "spectrum_concentration")
FILES = [f"{stem}.{ext}" for stem in STEMS for ext in ("png", "pdf")]
RECORD_FIELDS = {"kind", "bn_mode", "samples", "n_params", "n_probes", "n_steps", "nodes", "weights",
                 "top_eigenvalues", "top_k", "lambda_max", "lambda_k", "gradient_concentration", "grad_norm", "loss",
                 "mean_eigenvalue", "concentration_converged", "density_n_hvp", "concentration_n_hvp"}


@pytest.fixture
def small_spectrum(monkeypatch):
    """Cheap measurements: 64 images, 2 probes of 12 Lanczos steps, top 3."""
    monkeypatch.setattr(spectrum, "SAMPLES", 64)
    monkeypatch.setattr(spectrum, "N_PROBES", 2)
    monkeypatch.setattr(spectrum, "N_STEPS", 12)
    monkeypatch.setattr(spectrum, "TOP_K", 3)


# -- the schedule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("every,epochs,expected", [
    (0, 5, []),                      # off
    (1, 3, [0, 1, 2, 3]),            # init and every epoch
    (2, 5, [0, 2, 4, 5]),            # the last epoch although not a multiple
    (2, 4, [0, 2, 4]),               # the last epoch once, when it is one
    (10, 3, [0, 3]),                 # every > epochs: init and the end
    (5, 1, [0, 1]),
])
def test_due_at_init_multiples_and_the_last_epoch(every, epochs, expected):
    assert [e for e in range(epochs + 1) if spectrum.due(every, e, epochs)] == expected
    assert all(isinstance(spectrum.due(every, e, epochs), bool) for e in range(epochs + 1))


# -- one measurement ------------------------------------------------------------------------------------------
def _tiny(name: str):
    """The seed-000 MLP on 4x4 inputs (3,910 parameters; 4,110 with BatchNorm) a few SGD steps into training, so
    that the running statistics differ from the batch's and the gradient is not tiny."""
    torch.manual_seed(0)
    model = build_model(name, input_shape=(1, 4, 4), num_classes=10)
    x = torch.randn(48, 1, 4, 4) * 1.5 + 0.3
    y = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, (x, y)


@pytest.mark.parametrize("name,norm,modes", [("mlp", "none", ("batch",)), ("bn-mlp", "torch", ("batch", "running"))])
@pytest.mark.parametrize("train_flag", [True, False])
def test_measure_records_are_complete_and_leave_the_model_bit_for_bit(small_spectrum, name, norm, modes, train_flag):
    model, batch = _tiny(name)
    model.train(train_flag)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [p.grad.clone() for p in model.parameters()]   # left over from the last SGD step: kept too
    records = spectrum.measure(model, batch, norm)
    # the model, its buffers (BatchNorm running statistics, num_batches_tracked) and its train flags are untouched
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))

    n_params = sum(p.numel() for p in model.parameters())
    assert [r["bn_mode"] for r in records] == list(modes)
    for rec in records:
        assert set(rec) == RECORD_FIELDS and rec["kind"] == "spectrum"
        rec = json.loads(json.dumps(rec, allow_nan=False))   # what records.jsonl holds and the figures read
        assert (rec["samples"], rec["n_params"], rec["n_probes"], rec["n_steps"]) == (48, n_params, 2, 12)
        assert len(rec["nodes"]) == len(rec["weights"]) == 2
        for x, w in zip(rec["nodes"], rec["weights"]):
            assert len(x) == len(w) == 12
            assert x == sorted(x)
            assert min(w) >= 0 and math.isclose(sum(w), 1.0, rel_tol=0, abs_tol=1e-12)
        assert rec["density_n_hvp"] <= 2 * 12 and rec["concentration_n_hvp"] > 0

        # the record rebuilds exactly the DensityResult spectral_density returns
        density = spectrum.density_of(rec)
        assert density == smoothness.spectral_density(model, F.cross_entropy, batch, n_probes=2, n_steps=12,
                                                       bn_mode=rec["bn_mode"],
                                                       generator=torch.Generator().manual_seed(spectrum.PROBE_SEED))
        assert density.moment(1) == rec["mean_eigenvalue"]

        # top eigenvalues: descending, λ_max agrees with the toolkit's sharpness estimator on the same batch
        assert rec["top_k"] == 3 and len(rec["top_eigenvalues"]) == 3
        assert rec["top_eigenvalues"] == sorted(rec["top_eigenvalues"], reverse=True)
        assert rec["lambda_max"] == rec["top_eigenvalues"][0] and rec["lambda_k"] == rec["top_eigenvalues"][-1]
        assert rec["concentration_converged"] is True
        top = smoothness.top_eigenvalues(model, F.cross_entropy, batch, k=1, tol=1e-4, bn_mode=rec["bn_mode"])
        assert top.converged and rec["lambda_max"] == pytest.approx(top.values[0], rel=2e-4)
        # the density's nodes are Ritz values, never above the true λ_max, which the converged λ_max is within tol of
        assert max(max(x) for x in rec["nodes"]) <= rec["lambda_max"] * (1 + 1e-4)
        assert 0.0 <= rec["gradient_concentration"] <= 1.0
        assert rec["grad_norm"] > 0 and math.isfinite(rec["loss"])
    # and measuring again gives the same numbers (own seeded generators, untouched model)
    assert spectrum.measure(model, batch, norm) == records
    if len(records) == 2:   # population statistics give another loss, hence another spectrum
        assert records[0]["lambda_max"] != pytest.approx(records[1]["lambda_max"], rel=1e-3)


def test_top_k_is_capped_below_the_number_of_parameters(monkeypatch):
    """A network with fewer parameters than TOP_K + 1 still gets a record (k = n - 1)."""
    monkeypatch.setattr(spectrum, "N_STEPS", 4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2))   # 6 parameters
    x, y = torch.randn(16, 1, 2), torch.randint(0, 2, (16,))
    (rec,) = spectrum.measure(model, (x, y), "none")
    assert rec["top_k"] == 5 and len(rec["top_eigenvalues"]) == 5 and rec["n_params"] == 6


# -- inside a training run ------------------------------------------------------------------------------------
# MNIST-1D and the seed-000 MLP (as tests/experiments/test_resume_killpoints.py): about 0.2 s a run
BASE = dict(dataset="mnist1d", subset=0.03, epochs=3, batch_size=32, probe_every=3, probe_steps=3,
            local_smoothness_samples=64, sharpness_samples=32, sharpness_tol=1e-2, study="spectrum-test")


def _records(root, cfg):
    return [json.loads(line) for line in (root / cfg.run_id / "records.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["mlp", "bn-mlp"])
def test_spectrum_records_leave_the_training_trajectory_unchanged(small_spectrum, tmp_path, model):
    """The docstring's promise: the measurements draw from their own generators and leave the model alone, so
    every other record is the same with and without --spectrum-every."""
    plain = RunConfig(model=model, **BASE)
    spec = RunConfig(model=model, spectrum_every=2, **BASE)
    assert plain.run_id != spec.run_id
    assert train_run(plain, tmp_path).status == "done" and train_run(spec, tmp_path).status == "done"
    with_spec = _records(tmp_path, spec)
    assert [r for r in with_spec if r["kind"] != "spectrum"] == _records(tmp_path, plain)
    modes = ["batch"] if model == "mlp" else ["batch", "running"]
    got = [(r["epoch"], r["bn_mode"]) for r in with_spec if r["kind"] == "spectrum"]
    assert got == [(e, m) for e in (0, 2, 3) for m in modes]      # init, every 2 epochs, the last
    steps_per_epoch = next(r["step"] for r in with_spec if r["kind"] == "eval" and r["epoch"] == 1)
    for r in with_spec:
        if r["kind"] == "spectrum":
            assert r["step"] == r["epoch"] * steps_per_epoch and r["samples"] == 64
    timing = json.loads((tmp_path / spec.run_id / "timing.json").read_text())
    assert timing["spectrum"] > 0


def test_resume_after_a_kill_between_the_two_bn_modes(small_spectrum, tmp_path):
    """A kill after the batch-mode spectrum record of epoch 1, before the running-mode one: the resumed run's
    records.jsonl is byte-identical to the uninterrupted run's, as for every other record kind (issue 10).

    Failed before the fix: spectrum records held their wall-clock ``seconds``, so no two runs had the same records
    (the time already goes to timing.json, under ``spectrum``)."""
    cfg = RunConfig(model="bn-mlp", spectrum_every=1, **BASE)
    assert train_run(cfg, tmp_path / "whole").status == "done"
    reference = _records(tmp_path / "whole", cfg)

    class Kill(BaseException):
        pass

    append = RunStore.append

    def dying_append(store, record):
        if record["kind"] == "spectrum" and record["epoch"] == 1 and record["bn_mode"] == "running":
            raise Kill
        append(store, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunStore, "append", dying_append)
        with pytest.raises(Kill):
            train_run(cfg, tmp_path / "killed")
    torn = _records(tmp_path / "killed", cfg)
    assert torn[-1]["kind"] == "spectrum" and torn[-1]["bn_mode"] == "batch" and torn[-1]["epoch"] == 1
    assert train_run(cfg, tmp_path / "killed", resume=True).status == "done"
    assert (tmp_path / "killed" / cfg.run_id / "records.jsonl").read_bytes() == \
           (tmp_path / "whole" / cfg.run_id / "records.jsonl").read_bytes()
    assert len(_records(tmp_path / "killed", cfg)) == len(reference)


# -- the figures on a study with known spectra ----------------------------------------------------------------
def _density(level: float, seed: int, epoch: int, bn_mode: str) -> smoothness.DensityResult:
    """A bulk near 0 and one outlier at λ = 10·level·(1 + epoch/4) (+ seed, + 5 with running statistics)."""
    outlier = 10 * level * (1 + epoch / 4) + 0.5 * seed + (5.0 if bn_mode == "running" else 0.0)
    nodes = ((-0.2, -0.01, 0.0, 0.03, 0.4, outlier), (-0.1, 0.0, 0.02, 0.5, outlier - 0.1))
    weights = ((0.1, 0.3, 0.3, 0.2, 0.09, 0.01), (0.2, 0.4, 0.3, 0.08, 0.02))
    return smoothness.DensityResult(nodes=nodes, weights=weights, n_params=500, n_steps=6, n_hvp=11,
                                    bn_mode=bn_mode, batch_size=64)


def _spectrum_record(step: int, epoch: int, level: float, seed: int, bn_mode: str) -> dict:
    d = _density(level, seed, epoch, bn_mode)
    top = [max(d.nodes[0]), 0.6, 0.5]
    return {"kind": "spectrum", "step": step, "epoch": epoch, "bn_mode": bn_mode, "samples": d.batch_size,
            "n_params": d.n_params, "n_probes": d.n_probes, "n_steps": d.n_steps,
            "nodes": [list(x) for x in d.nodes], "weights": [list(w) for w in d.weights],
            "top_eigenvalues": top, "top_k": 3, "lambda_max": top[0], "lambda_k": top[-1],
            "gradient_concentration": round(0.9 - 0.1 * epoch + 0.01 * seed - (0.3 if bn_mode == "running" else 0),
                                            6),
            "grad_norm": 1.0, "loss": 1.0, "mean_eigenvalue": d.moment(1), "concentration_converged": True,
            "density_n_hvp": d.n_hvp, "concentration_n_hvp": 30}


LEVELS = {"convnet": 2.0, "bn-convnet": 0.5}


def add_spectra(study) -> None:
    """Insert spectrum records after every eval record of every fake run (both modes for BN networks), keeping
    an unfinished run's torn last line last."""
    for run in study.runs:
        level = LEVELS[run.model] * (1 + 10 * (run.lr - 0.04))
        modes = ("batch", "running") if run.model.startswith("bn-") else ("batch",)
        out = []
        for r in run.records:
            out.append(r)
            if r["kind"] == "eval":
                out += [_spectrum_record(r["step"], r["epoch"], level, run.seed, m) for m in modes]
        run.records = out
        text = (run.path / "records.jsonl").read_text()
        torn = "" if text.endswith("\n") else text[text.rindex("\n") + 1:]
        (run.path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out) + torn)


@pytest.fixture(scope="module")
def fake_study(tmp_path_factory):
    """Two networks x two learning rates x two seeds, 3 epochs (spectra at 0-3); convnet η=0.04 seed 1 unfinished."""
    study = make_results(tmp_path_factory.mktemp("fake"), seeds=(0, 1), lrs=(0.02, 0.04), epochs=3,
                         unfinished=(("convnet", 1, 0.04),))
    add_spectra(study)
    return study


def _mean_sd(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4g} ± {v.std(ddof=1):.2g}" if v.size > 1 else f"{v[0]:.4g}"


def test_fake_study_curves_per_network_and_learning_rate(fake_study):
    with pytest.warns(UserWarning, match="truncated last record"):   # the unfinished run's torn last line
        table = spectrum_table(fake_study.path)
    labels = {"convnet, η=0.02", "convnet, η=0.04", "bn-convnet, η=0.02", "bn-convnet, η=0.04"}
    assert set(table["model"]) == labels
    # the unfinished run is left out: convnet η=0.04 has seed 0 only
    unfinished = fake_study.run("convnet", 1, 0.04)
    assert unfinished.run_id not in set(table["run"])
    assert sorted(table[table["model"] == "convnet, η=0.04"]["seed"].unique()) == [0]
    assert len(table) == sum(len([r for r in run.records if r["kind"] == "spectrum"])
                             for run in fake_study.runs if run.status == "done")
    assert spectrum_figures.chosen_epochs(table) == [0, 2, 3]

    fig = spectrum_figures.density_figure(table)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["epoch 0", "epoch 2", "epoch 3"]
    for ax in axes:
        assert len(ax.lines) == 7      # one per finished run (8 runs, one unfinished), batch statistics only
        # every run's outlier shows as an isolated bump right of the bulk, far above the log-scale floor
        for line in ax.lines:
            x, y = line.get_data()
            assert y.min() >= spectrum_figures.FLOOR
            above = np.flatnonzero(y > 1e-3)
            assert np.count_nonzero(np.diff(above) > 1) == 1, "bulk and outlier: two separate bumps"
            assert y[np.argmin(abs(x - 0.0))] > 0.3    # the bulk
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert sorted(legend) == sorted(["convnet, η=0.02 (n=2 seeds)", "convnet, η=0.04 (n=1 seeds)",
                                     "bn-convnet, η=0.02 (n=2 seeds)", "bn-convnet, η=0.04 (n=2 seeds)"])

    fig = spectrum_figures.bn_modes_figure(table)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"bn-convnet, η={lr}, epoch {e}" for lr in ("0.02", "0.04") for e in (0, 2, 3)]
    for ax in fig.axes:
        if ax.get_title():
            assert sorted(line.get_linestyle() for line in ax.lines) == ["-", "-", "--", "--"]

    fig = spectrum_figures.concentration_figure(table)
    legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert "convnet, η=0.04, batch (n=1)" in legend and "bn-convnet, η=0.02, running (n=2)" in legend
    assert not any(t.startswith("convnet, η=0.04, running") for t in legend)   # no BN, no running mode


def test_fake_study_files_and_summary_numbers(fake_study, tmp_path):
    with pytest.warns(UserWarning, match="truncated last record"):   # the unfinished run's torn last line
        result = CliRunner().invoke(main, ["spectrum", str(fake_study.path), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(FILES)
    assert all((tmp_path / "figs" / f).stat().st_size > 5_000 for f in FILES)
    notice, *paths = result.output.splitlines()   # the notice (stderr) names the unfinished run left out
    assert notice.startswith("left out 1 run(s)") and fake_study.run("convnet", 1, 0.04).run_id in notice
    assert paths == [str(tmp_path / "figs" / f) for f in FILES] + [str(fake_study.path / "spectrum.md")]
    summary = (fake_study.path / "spectrum.md").read_text().split("## Paired tests")[0]
    assert "(Lanczos; k = 3)" in summary   # the fake records' top_k, so the reader knows which λ_k
    # every row recomputed from the records written, finished runs only
    done = [r for r in fake_study.runs if r.status == "done"]
    expected_rows = 0
    for model in ("convnet", "bn-convnet"):
        for lr in (0.02, 0.04):
            runs = [r for r in done if r.model == model and r.lr == lr]
            for bn_mode in ("batch", "running") if model.startswith("bn-") else ("batch",):
                for epoch in range(4):
                    recs = [x for r in runs for x in r.records
                            if x["kind"] == "spectrum" and x["epoch"] == epoch and x["bn_mode"] == bn_mode]
                    lmax = [x["lambda_max"] for x in recs]
                    rms = [math.sqrt(_density(LEVELS[model] * (1 + 10 * (lr - 0.04)), r.seed, epoch,
                                              bn_mode).moment(2)) for r in runs]
                    row = (f"| {model}, η={lr:g} | {bn_mode} | {epoch} | {len(recs)} | {_mean_sd(lmax)} | "
                           f"{_mean_sd([x['lambda_k'] for x in recs])} | "
                           f"{_mean_sd([a / x['lambda_k'] for a, x in zip(lmax, recs)])} | "
                           f"{_mean_sd([a / b for a, b in zip(lmax, rms)])} | "
                           f"{_mean_sd([x['mean_eigenvalue'] for x in recs])} | "
                           f"{_mean_sd([x['gradient_concentration'] for x in recs])} |")
                    assert row in summary.splitlines(), row
                    expected_rows += 1
    assert sum(line.startswith("| ") and "η=" in line for line in summary.splitlines()) == expected_rows == 24


def _paired_rows(markdown: str, family: str) -> list[list[str]]:
    section = markdown.split(f"## Paired tests: {family}")[1].split("## ")[0]
    return [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| ") and
            not line.startswith("| epoch")]


def test_paired_tests_pair_on_the_seed_and_holm_adjust_each_family():
    """Random spectra for 5 seeds of two networks (one unpaired extra seed), rows shuffled: every test row equals
    scipy's paired t-test on the seed-matched differences, and the Holm adjustment runs over each family."""
    rng = np.random.default_rng(0)
    rows = []
    for model, seeds in (("convnet", range(6)), ("bn-convnet", range(5))):
        for seed in seeds:
            for epoch in (0, 5, 10):
                for mode in ("batch", "running") if model == "bn-convnet" else ("batch",):
                    rows.append({"model": model, "lr": 0.04, "seed": seed, "options": "", "epoch": epoch,
                                 "bn_mode": mode, "lambda_max": rng.uniform(5, 50), "lambda_k": rng.uniform(1, 5),
                                 "rms_eigenvalue": rng.uniform(0.1, 1), "gradient_concentration": rng.uniform()})
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=1, ignore_index=True)
    markdown = spectrum_stats.comparison_markdown(table)
    ratio = {"λ_max": lambda r: r["lambda_max"], "λ_max / λ_k": lambda r: r["lambda_max"] / r["lambda_k"],
             "λ_max / rms": lambda r: r["lambda_max"] / r["rms_eigenvalue"],
             "concentration": lambda r: r["gradient_concentration"]}

    def values(model, epoch, mode, metric):
        sub = table[(table["model"] == model) & (table["epoch"] == epoch) & (table["bn_mode"] == mode)]
        return {int(r["seed"]): ratio[metric](r) for _, r in sub.iterrows()}

    for family, ((ma, sa), (mb, sb)) in (("Networks", (("convnet", "batch"), ("bn-convnet", "batch"))),
                                         ("Population statistics", (("bn-convnet", "batch"),
                                                                    ("bn-convnet", "running")))):
        got = _paired_rows(markdown, family)
        assert [(int(r[0]), r[1]) for r in got] == [(e, m) for e in (0, 10) for m in ratio]   # first and last epoch
        expected_p = []
        for r in got:
            a, b = values(ma, int(r[0]), sa, r[1]), values(mb, int(r[0]), sb, r[1])
            seeds = sorted(set(a) & set(b))
            assert seeds == [0, 1, 2, 3, 4] and r[4] == "5"             # seed 5 of convnet has no partner
            d = np.array([b[s] - a[s] for s in seeds])
            res = scipy.stats.ttest_rel([b[s] for s in seeds], [a[s] for s in seeds])
            assert float(r[5]) == pytest.approx(d.mean(), rel=1e-3)
            assert float(r[7]) == pytest.approx(res.pvalue, rel=1e-2, abs=1e-3)
            assert float(r[9]) == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-2)
            expected_p.append(res.pvalue)
        # Holm over the family's 8 tests, by hand
        order = np.argsort(expected_p)
        holm = np.empty(8)
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (8 - rank) * expected_p[i]))
            holm[i] = running
        for r, h in zip(got, holm):
            assert float(r[8]) == pytest.approx(h, rel=1e-2, abs=1e-3)


def test_study_without_spectrum_records_says_how_to_get_them(tmp_path):
    study = make_results(tmp_path, seeds=(0,))
    result = CliRunner().invoke(main, ["spectrum", str(study.path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no spectrum records" in result.output and "--spectrum-every" in result.output
    assert not any((study.path / "figures").iterdir()) and not (study.path / "spectrum.md").exists()


def test_spectrum_only_in_unfinished_runs_asks_to_finish_them(tmp_path):
    study = make_results(tmp_path, models=("convnet",), seeds=(0,), unfinished=(("convnet", 0),))
    add_spectra(study)
    with pytest.warns(UserWarning, match="truncated last record"):
        result = CliRunner().invoke(main, ["spectrum", str(study.path)])
    assert result.exit_code == 1 and "unfinished" in result.output and "--resume" in result.output
    assert not any((study.path / "figures").iterdir()) and not (study.path / "spectrum.md").exists()


# -- a tiny real study ----------------------------------------------------------------------------------------
try:
    load_dataset("fashion-mnist", subset=0.001, download=False)
    HAVE_FASHION = True
except DataError:
    HAVE_FASHION = False


@pytest.mark.skipif(not HAVE_FASHION, reason="real FashionMNIST not found offline: install Debian's "
                    "dataset-fashion-mnist or set SMOOTHNESS_DATA")
@pytest.mark.slow
def test_real_fashion_mnist_study_end_to_end(monkeypatch, tmp_path):
    """ConvNet and BN-ConvNet, 2 seeds, 1 epoch on 300 FashionMNIST images, spectrum at init and at the end
    (32 images, 8 Lanczos steps, top 2: a measurement is ~60 Hessian-vector products, ~1 s), through
    `smoothness-lab run` and `smoothness-lab spectrum`; the figures are deterministic."""
    for name, value in (("SAMPLES", 32), ("N_PROBES", 2), ("N_STEPS", 8), ("TOP_K", 2)):
        monkeypatch.setattr(spectrum, name, value)
    result = CliRunner().invoke(main, [
        "-q", "run", "--results-dir", str(tmp_path), "--models", "convnet,bn-convnet", "--seeds", "0-1",
        "--executor", "serial", "--subset", "0.005", "--epochs", "1", "--probe-every", "5",
        "--sharpness-samples", "32", "--local-smoothness-samples", "128", "--spectrum-every", "1", "--no-figures"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = tmp_path / "fashion-mnist-bn"
    runs = sorted(p for p in study.iterdir() if (p / "config.json").exists())
    assert len(runs) == 4
    for run in runs:
        assert (run / "done").exists()
        recs = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
        spec = [r for r in recs if r["kind"] == "spectrum"]
        modes = ("batch", "running") if run.name.startswith("bn-") else ("batch",)
        assert [(r["epoch"], r["bn_mode"]) for r in spec] == [(e, m) for e in (0, 1) for m in modes]
        for r in spec:
            assert r["samples"] == 32 and r["n_steps"] == 8 and r["top_k"] == 2
            assert r["lambda_max"] > 0 and 0 <= r["gradient_concentration"] <= 1
            assert math.isclose(spectrum.density_of(r).moment(1), r["mean_eigenvalue"])

    paths = CliRunner().invoke(main, ["spectrum", str(study)], catch_exceptions=False)
    assert paths.exit_code == 0, paths.output
    figures = study / "figures"
    assert sorted(p.name for p in figures.iterdir()) == sorted(FILES)
    first = {f: (figures / f).read_bytes() for f in FILES}
    summary = (study / "spectrum.md").read_text()
    assert all(len(b) > 5_000 for b in first.values())
    means, paired = summary.split("## Paired tests: Networks")
    rows = [line.split(" | ")[:4] for line in means.splitlines() if line.startswith("| ") and "convnet" in line]
    assert sorted(rows) == sorted([f"| {m}", mode, str(e), "2"] for m in ("convnet", "bn-convnet")
                                  for mode in (("batch", "running") if m == "bn-convnet" else ("batch",))
                                  for e in (0, 1))
    # paired tests at init and after the pass: 4 metrics for the networks, 4 for bn-convnet's two BN modes
    assert "## Paired tests: Population statistics" in paired
    assert sum(line.startswith(("| 0 |", "| 1 |")) for line in paired.splitlines()) == 16
    # the same records give byte-identical files
    again = CliRunner().invoke(main, ["-q", "spectrum", str(study)], catch_exceptions=False)
    assert again.exit_code == 0 and again.output == ""
    assert (study / "spectrum.md").read_text() == summary
    assert {f: (figures / f).read_bytes() for f in FILES} == first


# -- issue 20: corrupt, repeated and left-out records ---------------------------------------------------------
def _study_with_spectra(tmp_path, **kw):
    study = make_results(tmp_path, models=("convnet", "bn-convnet"), seeds=(0, 1), **kw)
    add_spectra(study)
    return study


def _duplicate(lines, i):
    lines.insert(i + 1, lines[i])


def _edit(change):
    def edit(lines, i):
        record = json.loads(lines[i])
        change(record)
        lines[i] = json.dumps(record)
    return edit


@pytest.mark.parametrize("damage,message", [
    # was averaged twice
    (_duplicate, "bad spectrum record: a second record of epoch 0, bn_mode batch (the first is on line"),
    # the fields are checked by the run store against the spectrum's Record (declared once)
    (_edit(lambda r: r.pop("nodes")), "corrupt record: 'nodes' must be a non-empty list of non-empty lists"),
    (_edit(lambda r: r.update(weights=r["weights"][:1])),
     "corrupt record: 'weights' and 'nodes' must have the same shape"),
    (_edit(lambda r: r["nodes"][0].__setitem__(2, None)), "corrupt record: 'nodes' must hold numbers, got None"),
    (_edit(lambda r: r.update(nodes=[], weights=[])), "corrupt record: 'nodes' must be a non-empty list"),
    (_edit(lambda r: r.pop("samples")), "corrupt record: 'samples' must be a non-negative integer, got None"),
    (_edit(lambda r: r.update(lambda_max="big")), "corrupt record: 'lambda_max' must be a number or null"),
    (_edit(lambda r: r.update(bn_mode="eval")), "corrupt record: 'bn_mode' must be 'batch' or 'running'"),
])
def test_bad_spectrum_record_is_refused_at_file_and_line(tmp_path, damage, message):
    """Failed before: a silent double count (n = 6 from 5 seeds) or one of six different tracebacks."""
    study = _study_with_spectra(tmp_path)
    path = study.runs[0].path / "records.jsonl"
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if '"spectrum"' in line)
    damage(lines, first)
    path.write_text("\n".join(lines) + "\n")
    bad = first + 2 if damage is _duplicate else first + 1
    result = CliRunner().invoke(main, ["spectrum", str(study.path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert f"{path}:{bad}: {message}" in result.output, result.output
    assert not any((study.path / "figures").iterdir()) and not (study.path / "spectrum.md").exists()


def test_left_out_runs_are_named_on_the_console(tmp_path):
    """Failed before: the console said nothing about the dropped run (only report.md mentions it)."""
    study = _study_with_spectra(tmp_path, unfinished=(("convnet", 1),))
    with pytest.warns(UserWarning, match="truncated last record"):
        result = CliRunner().invoke(main, ["-q", "spectrum", str(study.path)])
    assert result.exit_code == 0, result.output
    dropped = study.run("convnet", 1).run_id
    assert f"left out 1 run(s) that did not finish (their spectra are not averaged): {dropped} (unfinished)" \
        in result.output
