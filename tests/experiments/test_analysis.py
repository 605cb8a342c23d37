"""experiments.analysis against fake studies with hand-set numbers (tests/experiments/fake_results.py)."""
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
from fake_results import make_results  # noqa: E402

from experiments.analysis import AnalysisError, load, load_runs, plot_study, summary_table, write_report  # noqa
from experiments.analysis.figures import save_figure, seed_homework  # noqa: E402
from experiments.features.local_smoothness.figures import sharpness  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*truncated last record:UserWarning")
FIGURES = ("santurkar_fig4", "sharpness", "seed_homework")
MODELS = ("convnet", "bn-convnet")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("flagged"), diverged=[("convnet", 1)],
                        unfinished=[("bn-convnet", 2)])


def expected_per_run(records):
    """The report's per-run numbers, computed directly from the records that were written."""
    of = lambda kind: [r for r in records if r["kind"] == kind]  # noqa: E731
    probes, last_eval, last_smooth = of("probe"), of("eval")[-1], of("smoothness")[-1]
    beta = [p["effective_beta"] for p in probes]
    return {"final_train_loss": last_eval["train_loss"], "final_test_accuracy": last_eval["test_accuracy"],
            "final_test_loss": last_eval["test_loss"],
            "effective_beta_median": np.median(beta), "effective_beta_p90": np.percentile(beta, 90),
            "loss_range_width": np.median([p["loss_max"] - p["loss_min"] for p in probes]),
            "grad_predictiveness": np.median([p["grad_pred_max"] for p in probes]),
            "final_sharpness": last_smooth["sharpness"], "final_local_smoothness": last_smooth["local_smoothness"]}


def expected_values(study, model, metric, statuses=("done",)):
    return np.array([expected_per_run(r.records)[metric] for r in study.runs
                     if r.model == model and r.status in statuses])


def test_load_melts_every_numeric_field(clean):
    df = load(clean.path)
    assert list(df.columns) == ["run", "model", "seed", "lr", "norm", "dataset", "loss", "variant", "options", "status",
                                "kind", "step", "epoch", "metric", "value", "bn_mode"]
    assert set(df["variant"]) == {""} and df["options"].nunique() == 1  # one configuration: nothing to split
    numeric = sum(1 for run in clean.runs for r in run.records for k, v in r.items()
                  if k not in ("kind", "step", "epoch", "bn_mode") and not isinstance(v, (list, str)))
    assert len(df) == numeric
    assert not df["metric"].isin(["step_sizes", "losses", "grad_diff_norms", "reason"]).any()
    run = clean.run("bn-convnet", 1)
    beta = df[(df["run"] == run.run_id) & (df["metric"] == "effective_beta")]["value"].to_numpy()
    assert beta.tolist() == [r["effective_beta"] for r in run.records if r["kind"] == "probe"]
    assert set(df["status"]) == {"done"} and set(df["bn_mode"]) == {"batch", "running"}


def test_load_runs_flags_diverged_and_unfinished(flagged):
    with pytest.warns(UserWarning, match="truncated last record"):
        runs = load_runs(flagged.path)
    assert len(runs) == 6
    status = dict(zip(runs["run"], runs["status"]))
    assert status == {r.run_id: r.status for r in flagged.runs}
    div = runs[runs["status"] == "diverged"].iloc[0]
    assert div["diverged_step"] == 16 and div["model"] == "convnet" and div["seed"] == 1
    df = load(flagged.path)
    assert set(df["status"]) == {"done", "diverged", "unfinished"}
    assert math.isnan(df[(df["kind"] == "diverged")]["value"].iloc[0])  # null -> NaN, kept


def test_summary_matches_independent_statistics(clean):
    """Means and sds per model; b − a paired by seed: ttest_rel, its t-interval, d_z, Holm over the 9 metrics."""
    table = summary_table(load(clean.path))
    assert len(table) == 9 * 2
    raw = {}
    for metric, g in table.groupby("metric"):
        conv, bn = (expected_values(clean, m, metric) for m in MODELS)  # seed order 0, 1, 2 in both
        rows = g.set_index("model")
        for model, v in zip(MODELS, (conv, bn)):
            assert rows.loc[model, "n"] == 3
            assert rows.loc[model, "mean"] == pytest.approx(np.mean(v), rel=1e-12)
            assert rows.loc[model, "sd"] == pytest.approx(np.std(v, ddof=1), rel=1e-9)
        b = rows.loc["bn-convnet"]
        d = bn - conv
        t_crit = stats.t.ppf(0.975, 2)
        half = t_crit * np.std(d, ddof=1) / np.sqrt(3)
        assert (b["compared_to"], b["test"], b["n_compared"], b["effect_kind"]) == ("convnet", "paired t", 3, "d_z")
        assert b["diff"] == pytest.approx(d.mean(), rel=1e-12)
        assert (b["ci_low"], b["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-9)
        assert b["p"] == pytest.approx(stats.ttest_rel(bn, conv).pvalue, rel=1e-9)
        assert b["effect"] == pytest.approx(d.mean() / np.std(d, ddof=1), rel=1e-9)
        assert math.isnan(b["p_wilcoxon"]) and math.isnan(b["boot_low"])  # 3 pairs: below both minimum n
        assert not b["survivors_only"]
        raw[metric] = b["p"]
    # Holm by hand: the i-th smallest of m p-values is multiplied by m − i + 1, then made monotone
    order = sorted(raw, key=raw.get)
    expected, running = {}, 0.0
    for i, metric in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * raw[metric]))
        expected[metric] = running
    got = table.dropna(subset=["compared_to"]).set_index("metric")["p_holm"]
    assert got.to_dict() == pytest.approx(expected, rel=1e-12)


def test_summary_counts_but_never_averages_diverged(flagged):
    df = load(flagged.path)
    table = summary_table(df).set_index(["metric", "model"])
    for metric in ("final_test_accuracy", "effective_beta_median", "final_local_smoothness"):
        conv, bn = (table.loc[(metric, m)] for m in MODELS)
        assert (conv["n"], conv["diverged"], conv["unfinished"]) == (2, 1, 0)
        assert (bn["n"], bn["diverged"], bn["unfinished"]) == (2, 0, 1)
        assert conv["mean"] == pytest.approx(expected_values(flagged, "convnet", metric).mean(), rel=1e-12)
    with_unfinished = summary_table(df, include_unfinished=True).set_index(["metric", "model"])
    bn_all = expected_values(flagged, "bn-convnet", "effective_beta_median", ("done", "unfinished"))
    assert with_unfinished.loc[("effective_beta_median", "bn-convnet"), "n"] == 3
    assert with_unfinished.loc[("effective_beta_median", "bn-convnet"), "mean"] == pytest.approx(bn_all.mean())


def test_compare_argument(clean):
    df = load(clean.path)
    swapped = summary_table(df, compare=("bn-convnet", "convnet")).dropna(subset=["compared_to"])
    assert swapped["model"].unique().tolist() == ["convnet"]
    with pytest.raises(AnalysisError, match="two of the study's models"):
        summary_table(df, compare=("convnet", "vgg"))


def check_figures(out: Path, stems):
    for stem in stems:
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    assert not list(out.glob(".*"))  # no temp files left


def test_flagged_study_produces_every_output(flagged, tmp_path):
    paths = plot_study(flagged.path, out_dir=tmp_path / "figs")
    assert sorted(p.name for p in paths) == sorted(f"{s}.{e}" for s in FIGURES for e in ("png", "pdf"))
    check_figures(tmp_path / "figs", FIGURES)
    assert not (tmp_path / "figs" / "lr_sweep.png").exists()  # a single lr
    md = write_report(flagged.path, out_dir=tmp_path)
    text = md.read_text()
    assert "6 runs: 4 done, 1 diverged, 1 unfinished" in text
    # seed 1 of convnet diverged and seed 2 of bn-convnet is unfinished: one pair left, so Welch, said so
    assert "Welch (unpaired) (4); only 1 pair: unpaired test over all runs" in text and "Hedges' g" in text
    assert "diverged at step 16" in text and flagged.run("bn-convnet", 2).run_id in text
    assert (tmp_path / "report.csv").stat().st_size > 0 and not list(tmp_path.glob(".*"))


def test_default_out_dirs(tmp_path):
    study = make_results(tmp_path, seeds=(0, 1), epochs=2)
    plot_study(study.path)
    check_figures(study.path / "figures", FIGURES)
    assert write_report(study.path) == study.path / "report.md"


def test_lr_sweep_needs_two_lrs_and_figures_are_byte_reproducible(tmp_path):
    study = make_results(tmp_path, seeds=(0, 1), lrs=(0.02, 0.04), epochs=2, diverged=[("convnet", 0, 0.04)])
    paths = plot_study(study.path, out_dir=tmp_path / "figs")
    assert {"lr_sweep.png", "lr_sweep.pdf"} <= {p.name for p in paths}
    check_figures(tmp_path / "figs", FIGURES + ("lr_sweep",))
    from experiments.analysis.figures import lr_sweep, seed_homework
    df, runs = load(study.path), load_runs(study.path)
    for stem, draw in (("lr_sweep", lr_sweep), ("seed_homework", seed_homework)):  # drawn again: the same bytes
        for p in save_figure(draw(df, runs), tmp_path / "again", stem):
            assert p.read_bytes() == (tmp_path / "figs" / p.name).read_bytes(), p.name
    table = summary_table(load(study.path))
    assert sorted(table["lr"].unique()) == [0.02, 0.04]
    assert table[(table["lr"] == 0.04) & (table["model"] == "convnet")]["diverged"].eq(1).all()


def corrupt_middle(root: Path) -> tuple[Path, int]:
    study = make_results(root, seeds=(0,), epochs=1)
    path = study.runs[0].path / "records.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:20]
    path.write_text("\n".join(lines) + "\n")
    return study.path, path


@pytest.mark.parametrize("case", ["missing", "empty", "unrelated", "results-root", "corrupt", "done-truncated"])
def test_bad_input_raises_and_writes_nothing(tmp_path, case):
    target = tmp_path / "study"
    if case == "missing":
        match = "does not exist"
    elif case == "empty":
        target.mkdir()
        match = "is empty"
    elif case == "unrelated":
        (target / "notes").mkdir(parents=True)
        (target / "readme.txt").write_text("hello")
        match = "config.json and records.jsonl"
    elif case == "results-root":
        make_results(target, seeds=(0,), epochs=1, study="s1")
        match = r"holding the studies \['s1'\]"
    elif case == "corrupt":
        target, path = corrupt_middle(tmp_path)
        match = re.escape(f"{path}:5: corrupt record")
    else:
        study = make_results(tmp_path, seeds=(0,), epochs=1)
        path = study.runs[0].path / "records.jsonl"
        path.write_text(path.read_text() + '{"kind": "st')
        target, match = study.path, r"records.jsonl:\d+: corrupt record"
    out = tmp_path / "out"
    for call in (load, load_runs, lambda p: plot_study(p, out_dir=out), lambda p: write_report(p, out_dir=out)):
        with pytest.raises(AnalysisError, match=match):
            call(target)
    assert not out.exists()
    assert issubclass(AnalysisError, RuntimeError)


def test_failed_save_leaves_no_file(clean, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = sharpness(load(clean.path), load_runs(clean.path))

    def broken(f, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path, "sharpness")
    assert list(tmp_path.iterdir()) == []


def test_norm_variants_of_one_model_stay_apart(tmp_path):
    """A study such as noisy-bn runs convnet with several norms: each must get its own label, not be pooled."""
    study = make_results(tmp_path, models=("convnet", "bn-convnet", "convnet:noisy"), seeds=(0, 1))
    runs = load_runs(study.path)
    assert sorted(runs["model"].unique()) == ["bn-convnet", "convnet", "convnet:noisy"]
    assert (runs.groupby("model").size() == 2).all()
    assert set(load(study.path)["model"]) == {"convnet", "bn-convnet", "convnet:noisy"}
    table = summary_table(load(study.path))
    assert "convnet:noisy" in set(table["model"])


def test_beta_by_step_size_equals_hand_computation(tmp_path):
    from experiments.analysis.load import read_study
    from experiments.features.probe.tables import beta_by_step_size
    study = make_results(tmp_path, seeds=(0, 1))
    table = beta_by_step_size(read_study(study.path))
    for run_model in ("convnet", "bn-convnet"):
        probes = [r for fr in study.runs if fr.model == run_model for r in fr.records if r["kind"] == "probe"]
        for k, s in enumerate(probes[0]["step_sizes"]):
            expected = np.median([p["grad_diff_norms"][k] / (s * p["grad_norm"]) for p in probes])
            got = table[(table.model == run_model) & np.isclose(table.s_over_lr, round(s / 0.04, 3))]["median_ratio"]
            assert got.item() == pytest.approx(expected, rel=1e-12)
    assert "by probe step size" in write_report(study.path).read_text()


# -- issue 10 item 2: configs are split, never pooled as seeds --------------------------------------------------

def test_two_configs_in_one_folder_are_split_not_pooled(tmp_path):
    """The same grid relaunched with probe_every 5 into a folder of probe_every 10 runs: before, each model showed
    n=4 (n=2 per seed of identical training records: sd 0 for the training metrics). Now each configuration is its
    own group, labelled by the option that differs, and is compared only with its own configuration."""
    launches = {every: make_results(tmp_path, seeds=(0, 1), probe_every=every) for every in (2, 5)}
    study = launches[5]
    runs = load_runs(study.path)
    assert sorted(runs["model"].unique()) == ["bn-convnet [probe_every=2]", "bn-convnet [probe_every=5]",
                                              "convnet [probe_every=2]", "convnet [probe_every=5]"]
    table = summary_table(load(study.path))
    assert (table["n"] == 2).all() and (table["sd"].dropna() > 0).all()
    comps = table.dropna(subset=["compared_to"])
    assert sorted(set(zip(comps["compared_to"], comps["model"]))) == [
        ("convnet [probe_every=2]", "bn-convnet [probe_every=2]"),
        ("convnet [probe_every=5]", "bn-convnet [probe_every=5]")]
    assert set(comps["test"]) == {"paired t"} and (comps["n_compared"] == 2).all()
    # each comparison uses its own configuration's runs: the probe medians differ between the two
    beta = comps[comps["metric"] == "effective_beta_median"].set_index("compared_to")["diff"]
    expected = {f"convnet [probe_every={every}]": np.mean(expected_values(fake, "bn-convnet", "effective_beta_median")
                                                          - expected_values(fake, "convnet", "effective_beta_median"))
                for every, fake in launches.items()}
    assert beta.to_dict() == pytest.approx(expected, rel=1e-12)
    text = write_report(study.path).read_text()
    assert "split by the options that differ (probe_every=2; probe_every=5)" in text
    assert "### bn-convnet [probe_every=5] − convnet [probe_every=5]" in text


# -- issue 10 items 5 and 6: no run is dropped silently; bad input gives one line naming file:line ---------------

def test_run_directory_without_config_is_named_and_refused(tmp_path):
    study = make_results(tmp_path, seeds=(0, 1), epochs=1)
    orphan = study.runs[1].path
    (orphan / "config.json").unlink()
    out = tmp_path / "out"
    for call in (load, load_runs, lambda p: plot_study(p, out_dir=out), lambda p: write_report(p, out_dir=out)):
        with pytest.raises(AnalysisError, match=re.escape(orphan.name) + r" \(holds records.jsonl, done"):
            call(study.path)
    assert not out.exists()


def test_a_directory_with_only_a_run_log_is_named_in_a_warning(tmp_path):
    study = make_results(tmp_path, seeds=(0,), epochs=1)
    (study.path / "convnet-lr0.04-s9-000000000000").mkdir()
    (study.path / "convnet-lr0.04-s9-000000000000" / "run.log").write_text("start\n")
    (study.path / "notes").mkdir()  # unrelated folders stay ignored
    with pytest.warns(UserWarning, match="convnet-lr0.04-s9-000000000000 hold only a run.log"):
        assert len(load_runs(study.path)) == 2


def _corrupt(study, case):
    run = study.runs[0].path
    records, config = run / "records.jsonl", run / "config.json"
    lines = records.read_bytes().split(b"\n")
    if case == "non-utf8":
        lines[3] = lines[3][:10] + b"\xff" + lines[3][10:]
        records.write_bytes(b"\n".join(lines))
        return re.escape(f"{records}:4: corrupt record: not UTF-8 text (byte 0xff at column 11)")
    if case == "array":
        lines[2] = b"[1, 2, 3]"
        records.write_bytes(b"\n".join(lines))
        return re.escape(f"{records}:3: corrupt record: expected a JSON object, got an array")
    if case == "record-type":
        lines[2] = lines[2].replace(b'"loss": ', b'"loss": "abc", "x": ', 1)
        records.write_bytes(b"\n".join(lines))
        return re.escape(f"{records}:3: corrupt record: 'loss' must be a number or null, got 'abc'")
    if case == "step-type":
        lines[1] = lines[1].replace(b'"step": 0', b'"step": "0"', 1)
        records.write_bytes(b"\n".join(lines))
        return re.escape(f"{records}:2: corrupt record: 'step' must be a non-negative integer")
    text = config.read_text()
    if case == "lr-type":
        config.write_text(text.replace('"lr": 0.04', '"lr": "abc"'))
        line = 1 + config.read_text().splitlines().index('  "lr": "abc",')
        return re.escape(f"{config}:{line}: \"lr\" must be a positive number, got 'abc'")
    if case == "seed-type":
        config.write_text(text.replace('"seed": 0', '"seed": 0.5'))
        return re.escape(f"{config}:") + r"\d+: \"seed\" must be a non-negative integer, got 0.5"
    if case == "config-non-utf8":
        config.write_bytes(config.read_bytes().replace(b"convnet", b"conv\xffnet", 1))
        return re.escape(f"{config}: cannot be read as JSON")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["non-utf8", "array", "record-type", "step-type", "lr-type", "seed-type",
                                  "config-non-utf8"])
def test_bad_files_give_one_line_naming_file_and_line(tmp_path, case):
    from click.testing import CliRunner

    from experiments.cli import main
    study = make_results(tmp_path, seeds=(0,), epochs=1)
    match = _corrupt(study, case)
    with pytest.raises(AnalysisError, match=match):
        load(study.path)
    for command in ("report", "plot"):
        result = CliRunner().invoke(main, [command, str(study.path)])
        assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert re.search(match, result.output), result.output
    assert not (study.path / "report.md").exists() and not list((study.path / "figures").iterdir())


def test_unreadable_records_file_is_an_analysis_error(tmp_path, monkeypatch):
    """A records.jsonl the user may not read (mode 000; simulated, since root reads anything)."""
    study = make_results(tmp_path, seeds=(0,), epochs=1)
    path = study.runs[0].path / "records.jsonl"
    read_bytes = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(AnalysisError, match=re.escape(f"{path}: cannot be read (Permission denied)")):
        load(study.path)


# -- issue 11: the report names the study, treats divergence as an outcome, and agrees with the figures ---------

def test_report_names_the_study_by_its_folder(tmp_path, monkeypatch):
    study = make_results(tmp_path / "results", seeds=(0, 1), epochs=1)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    text = write_report("../results/fake-study").read_text()
    assert "# Smoothness report: fake-study" in text and "Study folder `fake-study`: 4 runs" in text
    assert "../" not in text and str(tmp_path) not in text
    assert study.path.exists()


def test_diverged_run_is_reported_with_its_rate_and_never_averaged(tmp_path):
    study = make_results(tmp_path, seeds=(0, 1, 2, 3), diverged=[("convnet", 1)])
    df = load(study.path)
    table = summary_table(df).set_index(["metric", "model"])
    conv, bn = table.loc[("final_test_accuracy", "convnet")], table.loc[("final_test_accuracy", "bn-convnet")]
    # the mean is over the 3 survivors and flagged; the comparison pairs seeds 0, 2, 3 and is flagged too
    survivors = expected_values(study, "convnet", "final_test_accuracy")
    assert (conv["n"], conv["diverged"], conv["survivors_only"]) == (3, 1, True)
    assert conv["mean"] == pytest.approx(survivors.mean(), rel=1e-12)
    bn_paired = np.array([expected_per_run(study.run("bn-convnet", s).records)["final_test_accuracy"]
                          for s in (0, 2, 3)])
    assert (bn["test"], bn["n_compared"], bn["left_out"], bn["survivors_only"]) == ("paired t", 3, 1, True)
    assert bn["p"] == pytest.approx(stats.ttest_rel(bn_paired, survivors).pvalue, rel=1e-9)
    from experiments.analysis import divergence_table
    div = divergence_table(load_runs(study.path)).set_index("model")
    assert div.loc["convnet", ["diverged", "done", "divergence_rate"]].tolist() == [1, 3, 0.25]
    assert div.loc["bn-convnet", "divergence_rate"] == 0
    assert div.loc["bn-convnet", "p_fisher"] == pytest.approx(stats.fisher_exact([[1, 3], [0, 4]]).pvalue)
    text = write_report(study.path).read_text()
    assert "| convnet | 0.04 | 4 | 3 | 1 | 0 | 1/4 (25%) |" in text
    assert "Divergence: convnet 1/4, bn-convnet 0/4 (Fisher's exact p = 1.000)." in text
    assert f"{_fmt(survivors.mean())} ± {_fmt(survivors.std(ddof=1), 3)} (n=3) †" in text
    assert "paired t (3); 1 run(s) without a partner left out" in text


def _fmt(x, digits=4):
    return f"{x:.{digits}g}"


def _bold_lines(ax):
    from experiments.analysis.figures import MEAN_LW
    return [ln for ln in ax.get_lines() if ln.get_linewidth() == MEAN_LW]


def test_lr_sweep_figure_averages_exactly_the_runs_the_report_averages(tmp_path):
    """Before, the figure averaged unfinished runs that the report excluded."""
    study = make_results(tmp_path, seeds=(0, 1, 2), lrs=(0.02, 0.04), epochs=2,
                         unfinished=[("convnet", 0, 0.04)], diverged=[("bn-convnet", 1, 0.04)])
    from experiments.analysis.figures import lr_sweep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df, runs = load(study.path), load_runs(study.path)
    table = summary_table(df)
    fig = lr_sweep(df, runs)
    panels = {ax.get_title(): ax for ax in fig.axes}
    for title, metric in (("(a) final test accuracy", "final_test_accuracy"),
                          ("(b) final test loss (cross-entropy, test set)", "final_test_loss")):
        drawn = {tuple(np.round(ln.get_ydata(), 12)) for ln in _bold_lines(panels[title])}
        reported = {tuple(np.round(table[(table["metric"] == metric) & (table["model"] == m)]
                                   .sort_values("lr")["mean"].to_numpy(), 12)) for m in MODELS}
        assert drawn == reported
    rate = {tuple(ln.get_ydata()) for ln in _bold_lines(panels["(d) divergence rate"])}
    assert rate == {(0.0, 0.0), (0.0, 1 / 3)}


def test_figures_draw_every_seed_thin_and_the_mean_bold(tmp_path):
    from experiments.analysis.figures import SEED_LW, seed_homework
    study = make_results(tmp_path, seeds=(0, 1, 2), epochs=3, diverged=[("convnet", 2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df, runs = load(study.path), load_runs(study.path)
    fig = seed_homework(df, runs)
    panels = {ax.get_title().split(" [")[0]: ax for ax in fig.axes}
    assert list(panels) == ["(a) train loss, rolling mean ≤25 steps", "(b) test loss", "(c) test accuracy",
                            "(d) local smoothness, u = −η·g"]
    for title, field in (("(b) test loss", "test_loss"), ("(c) test accuracy", "test_accuracy")):
        ax = panels[title]
        thin = sorted(tuple(ln.get_ydata()) for ln in ax.get_lines() if ln.get_linewidth() == SEED_LW)
        per_run = sorted(tuple(r[field] for r in run.records if r["kind"] == "eval") for run in study.runs)
        assert thin == per_run  # one thin line per run, the diverged run up to its divergence
        bold = {tuple(np.round(ln.get_ydata(), 12)) for ln in _bold_lines(ax)}
        expected = set()
        for model in MODELS:
            done = [[r[field] for r in run.records if r["kind"] == "eval"] for run in study.runs
                    if run.model == model and run.status == "done"]
            expected.add(tuple(np.round(np.mean(done, axis=0), 12)))
        assert bold == expected  # the mean of the finished runs only
        assert not ax.collections  # n = 3 (and 2): no band
        assert ax.get_yscale() == ("log" if field == "test_loss" else "linear")


def test_band_appears_from_five_runs(tmp_path):
    from scipy.stats import t

    from experiments.features.local_smoothness.figures import sharpness
    study = make_results(tmp_path, seeds=(0, 1, 2, 3, 4), epochs=2, models=("convnet",))
    fig = sharpness(load(study.path), load_runs(study.path))
    (band,) = fig.axes[0].collections
    values = np.array([[r["sharpness"] for r in run.records if r["kind"] == "smoothness"] for run in study.runs])
    half = t.ppf(0.975, 4) * values.std(axis=0, ddof=1) / np.sqrt(5)
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx((values.mean(axis=0) + half).max(), rel=1e-9)


def test_test_loss_is_reported(clean, tmp_path):
    text = write_report(clean.path, out_dir=tmp_path).read_text()
    conv = expected_values(clean, "convnet", "final_test_loss")
    assert f"| final test loss (cross-entropy, test set) | running | {_fmt(conv.mean())} ± " in text


def test_loss_labels_come_from_the_runs_config(tmp_path):
    """Issue 20 §2: a square-loss study's report called its losses "cross-entropy"."""
    study = make_results(tmp_path, seeds=(0, 1), epochs=1, loss="mse")
    text = write_report(study.path, out_dir=tmp_path).read_text()
    assert "final test loss (mse, test set)" in text and "final train loss (mse, whole training subset)" in text
    assert "cross-entropy" not in text
    assert set(load(study.path)["loss"]) == {"mse"}
    figures = plot_study(study.path, out_dir=tmp_path / "figs")
    labels = _axis_labels(seed_homework(load(study.path), load_runs(study.path)))
    assert "training loss (mse, log scale)" in labels and not any("cross-entropy" in x for x in labels)
    assert figures


def _axis_labels(fig) -> list:
    return [ax.get_ylabel() for ax in fig.axes]


def test_report_and_figures_respect_the_umask(tmp_path):
    """Issue 10 §9: the report and figures went through tempfile.mkstemp and came out 0600 whatever the umask."""
    import os
    import stat

    study = make_results(tmp_path, seeds=(0, 1), epochs=1)
    old = os.umask(0o022)
    try:
        written = [write_report(study.path), study.path / "report.csv", *plot_study(study.path)]
    finally:
        os.umask(old)
    assert written and {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
        p.name: oct(0o644) for p in written}


def test_a_figure_registered_from_outside_the_package_is_drawn(tmp_path, monkeypatch):
    """``plot_study`` draws every registered feature's figures: a writer added by a user (a name, when it applies, how to
    draw it, an optional table) gets its png/pdf and its .md like the built-in ones; one that does not apply, nothing."""
    from matplotlib.figure import Figure

    from experiments import features
    from experiments.analysis import FigureWriter, register_figure

    request_cleanup = ["figure:records_per_run", "figure:never"]

    def steps_per_run(df, runs, smooth, include_unfinished):
        fig = Figure()
        fig.subplots().bar(runs["run"], runs["n_records"])
        return fig

    register_figure(FigureWriter("records_per_run", lambda df, runs: len(runs) > 1, steps_per_run,
                                 table=lambda df, runs: f"{len(runs)} runs\n"))
    register_figure(FigureWriter("never", lambda df, runs: False, steps_per_run))
    with pytest.raises(ValueError, match="already registered"):
        register_figure(FigureWriter("eos", lambda df, runs: True, steps_per_run))
    study = make_results(tmp_path, seeds=(0, 1), epochs=1)
    try:
        names = [p.name for p in plot_study(study.path, out_dir=tmp_path / "figs")]
    finally:
        for name in request_cleanup:
            features.unregister(name)
    assert names[-3:] == ["records_per_run.png", "records_per_run.pdf", "records_per_run.md"]
    assert not any(n.startswith("never") for n in names)
    assert (tmp_path / "figs" / "records_per_run.png").stat().st_size > 0
    assert (study.path / "records_per_run.md").read_text() == f"{len(load_runs(study.path))} runs\n"


@pytest.mark.parametrize("seeds, t_band", [((0, 1), False), ((0, 1, 2, 3, 4), True)])
def test_santurkar_fig4_legend_says_what_the_shading_spans(tmp_path, seeds, t_band):
    """Panels (a), (b) shade min..max over probe step sizes, not a t-interval; (c) has a t-interval, from 5 runs."""
    from experiments.features.probe.figures import santurkar_fig4
    study = make_results(tmp_path, seeds=seeds, epochs=2, models=("convnet",))
    fig = santurkar_fig4(load(study.path), load_runs(study.path))
    (shading,) = [t.get_text() for t in fig.legends[0].get_texts() if t.get_text().startswith("shading")]
    assert "(a), (b) min..max over step sizes s" in shading
    assert ("(c) 95% t-interval" in shading) == t_band
    assert all(ax.collections for ax in fig.axes[:2])  # the min..max shading is drawn in (a) and (b)
