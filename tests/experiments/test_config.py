"""RunConfig / StudyConfig: validation names the option, ids are stable hashes of what changes the numbers."""
import dataclasses

import pytest

from experiments.config import ConfigError, RunConfig, StudyConfig


def test_defaults_are_the_seed_homework():
    cfg = RunConfig()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.subset, cfg.sampling) == (0.04, 32, 10, 0.1, "replacement")
    assert cfg.probe_every == 10 and cfg.probe_steps == 8
    sizes = cfg.step_sizes
    assert len(sizes) == 8 and sizes[0] == pytest.approx(0.5 * 0.04) and sizes[-1] == pytest.approx(4 * 0.04)
    assert all(b > a for a, b in zip(sizes, sizes[1:]))


def test_norm_resolves_to_model_default():
    assert RunConfig(model="convnet").norm == "none"
    assert RunConfig(model="bn-convnet").norm == "torch"
    assert RunConfig(model="convnet", norm="noisy").norm == "noisy"


def test_run_id_hashes_numbers_not_execution_details():
    a = RunConfig(seed=1)
    assert a.run_id == RunConfig(seed=1, device="cpu", study="other").run_id
    assert a.run_id != RunConfig(seed=2).run_id
    assert a.run_id != RunConfig(seed=1, probe_every=5).run_id
    assert a.run_id.startswith("convnet-lr0.04-s1-")
    assert RunConfig.from_dict({**a.to_dict(), "run_id": a.run_id}) == a


@pytest.mark.parametrize("field,value,option", [
    ("lr", 0.0, "--lr"), ("lr", -1.0, "--lr"), ("batch_size", 0, "--batch-size"), ("epochs", -2, "--epochs"),
    ("probe_every", -1, "--probe-every"), ("subset", 0.0, "--subset"), ("subset", 1.5, "--subset"),
    ("sampling", "bogus", "--sampling"), ("probe_bn_mode", "train", "--probe-bn-mode"),
    ("device", "tpu", "--device"),
])
def test_bad_values_name_the_option(field, value, option):
    with pytest.raises(ConfigError, match=option):
        RunConfig(**{field: value})


def test_unknown_model_dataset_norm_list_choices():
    with pytest.raises(ConfigError, match="convnet, bn-convnet"):
        RunConfig(model="resnet")
    with pytest.raises(ConfigError, match="fashion-mnist"):
        RunConfig(dataset="imagenet")
    with pytest.raises(ConfigError, match="none, torch"):
        RunConfig(norm="group")


def test_study_grid_and_model_norm_syntax():
    study = StudyConfig(models=("convnet", "convnet:l2"), lrs=(0.01, 0.1), seeds=(0, 1))
    runs = study.runs()
    assert len(runs) == 8
    assert {(r.model, r.norm) for r in runs} == {("convnet", "none"), ("convnet", "l2")}
    assert len({r.run_id for r in runs}) == 8
    with pytest.raises(ConfigError, match="empty"):
        StudyConfig(seeds=())
    with pytest.raises(ConfigError, match="twice"):
        StudyConfig(seeds=(0, 0))


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lr = 1.0
