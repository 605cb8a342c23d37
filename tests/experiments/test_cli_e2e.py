"""End to end through the CLI on a small subset of real FashionMNIST (skipped, saying why, without the data)."""
import json

import pytest
from click.testing import CliRunner

from experiments.cli import main
from experiments.data import DataError, load_dataset

try:
    load_dataset("fashion-mnist", subset=0.001, download=False)
    HAVE_FASHION = True
except DataError:
    HAVE_FASHION = False

needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="real FashionMNIST not found offline: install Debian's "
                                   "dataset-fashion-mnist or set SMOOTHNESS_DATA (CI installs it)")
SMALL = ["--subset", "0.005", "--epochs", "2", "--probe-every", "5", "--sharpness-samples", "32",
         "--local-smoothness-samples", "128"]


@needs_fashion
@pytest.mark.slow
def test_run_two_models_two_seeds_on_real_fashion_mnist(tmp_path):
    result = CliRunner().invoke(main, ["-q", "run", "--results-dir", str(tmp_path), "--seeds", "0-1",
                                       "--executor", "serial", *SMALL], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = tmp_path / "fashion-mnist-bn"
    runs = sorted(p for p in study.iterdir() if (p / "config.json").exists())
    assert [p.name.split("-lr")[0] for p in runs] == ["bn-convnet", "bn-convnet", "convnet", "convnet"]
    for run in runs:
        assert (run / "done").exists()
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["dataset"] == "fashion-mnist" and cfg["subset"] == 0.005
        kinds = {json.loads(line)["kind"] for line in (run / "records.jsonl").read_text().splitlines()}
        assert kinds == {"step", "probe", "eval", "smoothness"}
    figures = {p.name for p in (study / "figures").iterdir()}
    for stem in ("santurkar_fig4", "sharpness", "seed_homework"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= figures
        assert (study / "figures" / f"{stem}.png").stat().st_size > 10_000
    report = (study / "report.md").read_text()
    assert "convnet" in report and "bn-convnet" in report and "Welch" in report
    # relaunching the same study skips finished runs and changes nothing
    before = {p: (p / "records.jsonl").read_bytes() for p in runs}
    launch_log = (study / "launch.json").read_bytes()
    again = CliRunner().invoke(main, ["run", "--results-dir", str(tmp_path), "--seeds", "0-1", "--executor",
                                      "serial", "--no-figures", *SMALL])
    assert again.exit_code == 0 and "4 skipped" in again.output
    assert all((p / "records.jsonl").read_bytes() == b for p, b in before.items())
    assert (study / "launch.json").read_bytes() == launch_log   # nothing ran: nothing logged (issue 20 item 2)
    launches = json.loads(launch_log)["launches"]
    assert [x["runs"] for x in launches] == [{"done": 4}] and launches[0]["wall_seconds"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--models", "resnet"], "convnet, bn-convnet"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--probe-every", "-3"], "--probe-every"),
    (["--subset", "1.5"], "--subset"),
    (["--dataset", "imagenet"], "fashion-mnist"),
    (["--study", "nope"], "fashion-mnist-bn"),
    (["--lrs", "0.1,,x"], "--lrs"),
    (["--seeds", "3-1"], "--seeds"),
])
def test_bad_options_fail_before_any_work(tmp_path, args, needle):
    result = CliRunner().invoke(main, ["run", "--results-dir", str(tmp_path), "--dataset", "synthetic", *args])
    assert result.exit_code != 0
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not any(tmp_path.rglob("config.json"))


@pytest.mark.parametrize("study", ["../outside", "", ".", "..", "a/b"])
def test_train_study_must_be_one_folder_under_results_dir(tmp_path, study):
    """Failed before the fix: `--study ../outside` wrote next to --results-dir, `--study ""` into its root."""
    root = tmp_path / "inside" / "results"
    result = CliRunner().invoke(main, ["train", "--results-dir", str(root), "--dataset", "synthetic", "--study",
                                       study])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--study must be a plain folder name" in result.output and repr(study) in result.output
    assert not any(tmp_path.rglob("*.json")) and not any(tmp_path.rglob("run.log"))


def test_unwritable_results_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["run", "--results-dir", str(blocker / "sub"), "--dataset", "synthetic"])
    assert result.exit_code != 0 and "not writable" in result.output


def test_missing_fashion_mnist_says_where_it_looked(tmp_path, monkeypatch):
    import experiments.data as data
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", ())
    monkeypatch.delenv("SMOOTHNESS_DATA", raising=False)
    monkeypatch.chdir(tmp_path)

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(data.torchvision.datasets, "FashionMNIST", offline)
    data._read_fashion_dir.cache_clear() if hasattr(data._read_fashion_dir, "cache_clear") else None
    result = CliRunner().invoke(main, ["train", "--results-dir", str(tmp_path / "r"), "--data-dir",
                                       str(tmp_path / "empty")])
    assert result.exit_code != 0
    for needle in ("--data-dir", "SMOOTHNESS_DATA", "dataset-fashion-mnist", str(tmp_path / "empty")):
        assert needle in result.output
    assert not (tmp_path / "r" / "train").exists() or not any((tmp_path / "r" / "train").iterdir())


def test_train_command_writes_one_run(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", "bn-convnet", "--dataset", "synthetic", "--subset",
                                       "0.05", "--epochs", "1", "--sharpness-samples", "16",
                                       "--results-dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = [p for p in (tmp_path / "train").iterdir() if p.is_dir()]
    assert (run / "done").exists() and (run / "run.log").exists()
