"""The one study loader (experiments.analysis.load.read_study, experiments.study) against the hostile folders a user
made: runs of two configurations in one folder, a copied run folder, a BatchNorm network not named bn-, and a
finished run whose records were cut at a line boundary."""
import json
import shutil

import pandas as pd
import pytest

from experiments.analysis import AnalysisError
from experiments.analysis.load import read_study
from experiments.config import RunConfig
from experiments.features.generalization.table import study_table, write_generalization
from experiments.features.per_layer.figures import plot_per_layer
from experiments.status import run_info
from experiments.study import batch_normalised
from experiments.training import train_run

TINY = dict(dataset="synthetic", subset=0.08, epochs=1, batch_size=32, probe_every=0, sharpness_samples=32,
            local_smoothness_samples=64, per_layer=True, generalization_every=1, generalization_samples=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """mlp and bn-mlp, seeds 0 and 1, one pass, with per-layer and generalization records."""
    root = tmp_path_factory.mktemp("loader") / "study"
    outcomes = [train_run(RunConfig(model=m, seed=s, **TINY), root) for m in ("mlp", "bn-mlp") for s in (0, 1)]
    assert all(o.status == "done" for o in outcomes)
    return root


@pytest.fixture
def study(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "study")


def relaunched(run_dir, study_dir, **changes):
    """A valid run of another configuration: the run's files under the config with ``changes``, in the folder its
    new run id names (as if that configuration had been run; its records are the original's)."""
    config = json.loads((run_dir / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("run_id", "config_hash")} | changes
    cfg = RunConfig.from_dict(config)
    target = study_dir / cfg.run_id
    shutil.copytree(run_dir, target)
    (target / "config.json").write_text(json.dumps({**cfg.to_dict(), "run_id": cfg.run_id,
                                                    "config_hash": cfg.config_hash}, indent=2))
    return target


def paired_rows(markdown: str) -> list[dict]:
    """The rows of the markdown tables of paired tests (columns layer, metric, a, b, pairs, ...)."""
    rows, header = [], None
    for line in markdown.splitlines():
        if line.startswith("| layer | metric | a | b |"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif header and line.startswith("|") and not line.startswith("|---"):
            rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
        elif not line.startswith("|"):
            header = None
    return rows


def variant_of(label: str) -> str:
    return label.partition(" [")[2].split("]")[0]


def test_a_copied_run_folder_is_left_out_and_named(study):
    """cp -r of a run folder: its config names the original run; counted, it would pair twice."""
    original = sorted(p for p in study.iterdir() if p.name.startswith("bn-mlp"))[0]
    shutil.copytree(original, study / "bn-mlp-copy")
    said = []
    runs = read_study(study, said.append)
    assert len(runs) == 4 and "bn-mlp-copy" not in {r.path.name for r in runs}
    assert any("left out bn-mlp-copy" in m and original.name in m for m in said)
    assert run_info(study / "bn-mlp-copy")[0] == "corrupt"
    plot_per_layer(study, notify=said.append)
    rows = [r for r in paired_rows((study / "per_layer.md").read_text()) if r["metric"] == "λ_min(H)"]
    assert rows and all(r["pairs"] == "2" for r in rows)


def test_a_renamed_run_folder_whose_config_hashes_elsewhere_is_left_out(study):
    run = sorted(study.iterdir())[0]
    config = json.loads((run / "config.json").read_text())
    del config["run_id"], config["config_hash"]
    (run / "config.json").write_text(json.dumps(config))
    run.rename(study / "renamed-run")
    said = []
    assert "renamed-run" not in {r.path.name for r in read_study(study, said.append)}
    assert any("renamed-run" in m and "run id" in m for m in said)


def test_per_layer_never_compares_or_pools_two_configurations(study):
    for run in list(study.iterdir()):
        relaunched(run, study, epochs=2)
    said = []
    plot_per_layer(study, notify=said.append)
    rows = paired_rows((study / "per_layer.md").read_text())
    network_rows = [r for r in rows if r["metric"] != "λ_max: H − G"]
    assert network_rows and all(variant_of(r["a"]) == variant_of(r["b"]) for r in network_rows)
    assert {variant_of(r["a"]) for r in network_rows} == {"epochs=1", "epochs=2"}
    assert all(r["pairs"] == "2" for r in network_rows)


def test_generalization_analyses_each_configuration_apart(study):
    for run in list(study.iterdir()):
        relaunched(run, study, epochs=2)
    table = study_table(study)
    assert sorted(table["variant"].unique()) == ["epochs=1", "epochs=2"]
    said = []
    paths = write_generalization(study, n_resamples=100, notify=said.append)
    for variant in ("epochs=1", "epochs=2"):
        csv = pd.read_csv(study / "generalization" / variant / "generalization.csv")
        assert (csv["n_used"] <= 4).all() and (csv["n_used"] > 0).all()
        assert study / "generalization" / variant / "generalization.md" in paths
    assert not (study / "generalization.md").exists()
    assert any("never pooled" in m for m in said)


def test_the_bn_axis_comes_from_the_network_not_the_name(study):
    """mlp with norm torch (given as mlp:torch) is the BN network; generalization's bn axis says so."""
    bn_run = sorted(p for p in study.iterdir() if p.name.startswith("bn-mlp"))[0]
    moved = relaunched(bn_run, study, model="mlp", norm="torch")
    shutil.rmtree(bn_run)
    table = study_table(study).set_index("run")
    assert bool(table.loc[moved.name, "bn"]) is True
    assert not table[table["model"] == "mlp"].drop(moved.name)["bn"].any()
    assert batch_normalised({"model": "bn-mlp", "norm": "none"}) is False
    assert batch_normalised({"model": "convnet", "norm": "noisy"}) is True


def test_a_finished_run_cut_at_a_line_boundary_is_left_out_and_named(study):
    run = sorted(study.iterdir())[0]
    lines = (run / "records.jsonl").read_text().splitlines(keepends=True)
    (run / "records.jsonl").write_text("".join(lines[:len(lines) // 2]))
    said = []
    runs = read_study(study, said.append)
    assert run.name not in {r.path.name for r in runs} and len(runs) == 3
    assert any(run.name in m and "truncated" in m for m in said)


def test_a_folder_of_copies_only_is_one_line_error(study, tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    shutil.copytree(sorted(study.iterdir())[0], only / "a-copy")
    with pytest.raises(AnalysisError, match="left out"):
        read_study(only, lambda m: None)


def test_generalization_never_pools_two_networks_but_keeps_bn_as_an_axis(study):
    """mlp and bn-mlp are one network on the BN axis; fc-tanh runs in the same folder are another variant."""
    for run in [p for p in study.iterdir() if p.name.startswith("mlp")]:
        relaunched(run, study, model="fc-tanh")
    table = study_table(study)
    variants = dict(zip(table["model"], table["variant"]))
    assert variants["mlp"] == variants["bn-mlp"] == "network=mlp" and variants["fc-tanh"] == "network=fc-tanh"
    assert sorted(table[table["variant"] == "network=mlp"]["bn"]) == [False, False, True, True]


def test_spectrum_tests_compare_within_a_configuration_and_a_network():
    from experiments.features.spectrum.stats import comparison_markdown
    rows = []
    for variant in ("epochs=1", "epochs=2"):
        for model in ("mlp", "bn-mlp", "fc-tanh"):
            for seed in (0, 1, 2):
                for epoch in (0, 1):
                    value = 1.0 + seed + (model == "bn-mlp") + 0.1 * epoch
                    rows.append({"run": f"{model}-{variant}-{seed}", "model": f"{model} [{variant}]",
                                 "variant": variant, "lr": 0.04, "seed": seed, "options": variant, "epoch": epoch,
                                 "bn_mode": "batch", "lambda_max": value, "lambda_k": value / 2,
                                 "rms_eigenvalue": value / 3, "gradient_concentration": 0.5})
    markdown = comparison_markdown(pd.DataFrame(rows))
    pairs = [line.split("|")[3:5] for line in markdown.splitlines() if line.startswith("| ") and "λ_max" in line]
    assert pairs and all(variant_of(a.strip()) == variant_of(b.strip()) for a, b in pairs)
    assert {(a.strip().split(" [")[0], b.strip().split(" [")[0]) for a, b in pairs} == {("mlp", "bn-mlp")}
