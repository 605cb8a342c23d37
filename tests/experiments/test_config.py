"""RunConfig / StudyConfig: validation names the option, ids are stable hashes of what changes the numbers."""
import dataclasses
import json
from pathlib import Path

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
    ("lr", 0.0, "--lr"), ("lr", -1.0, "--lr"), ("batch_size", -1, "--batch-size"), ("epochs", -2, "--epochs"),
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


# ---------------------------------------------------------------------------------------------------------------
# issue 13: optimizers, schedules, full batch, step-wise sharpness

RESULTS = Path(__file__).resolve().parents[2] / "results"


def test_committed_runs_keep_their_ids():
    """The fields added later enter the hash only when set, so every published run directory is still found."""
    configs = sorted(RESULTS.glob("*/*/config.json"))
    assert len(configs) >= 6
    for path in configs:
        saved = json.loads(path.read_text())
        cfg = RunConfig.from_dict(saved)
        assert cfg.run_id == saved["run_id"] == path.parent.name, path


@pytest.mark.parametrize("field, value", [
    ("loss", "mse"), ("optimizer", "adam"), ("momentum", 0.9), ("weight_decay", 1e-4), ("lr_schedule", "cosine"),
    ("warmup_steps", 5), ("probe_direction", "update"), ("eval_every", 2), ("sharpness_every", 10),
    ("batch_size", 0),
])
def test_new_fields_change_the_id_when_set(field, value):
    assert RunConfig(**{field: value}).run_id != RunConfig().run_id
    assert field in RunConfig(**{field: value}).hashed_dict()


def test_defaults_of_new_fields_are_not_hashed_but_saved():
    cfg = RunConfig()
    assert "optimizer" not in cfg.hashed_dict() and cfg.to_dict()["optimizer"] == "sgd"
    assert RunConfig(momentum=0.0, optimizer="sgd").run_id == cfg.run_id


def test_full_batch_is_zero_and_one_step_per_pass():
    cfg = RunConfig(batch_size="full")
    assert cfg.batch_size == 0 and cfg.full_batch and cfg.steps_per_epoch(5000) == 1
    assert cfg.total_steps(5000) == cfg.epochs
    assert RunConfig(batch_size=32).steps_per_epoch(6000) == round(6000 / 32)


def test_step_sizes_follow_the_scheduled_lr():
    cfg = RunConfig(lr=0.1)
    assert cfg.step_sizes == cfg.step_sizes_at(0.1)
    assert cfg.step_sizes_at(0.05) == pytest.approx(tuple(s / 2 for s in cfg.step_sizes))


@pytest.mark.parametrize("options, message", [
    (dict(optimizer="rmsprop"), "unknown --optimizer 'rmsprop'; choose one of: sgd, adam, adamw"),
    (dict(lr_schedule="linear"), "unknown --lr-schedule 'linear'; choose one of: constant, cosine, step"),
    (dict(loss="hinge"), "unknown --loss 'hinge'; choose one of: cross-entropy, mse"),
    (dict(probe_direction="random"), "unknown --probe-direction 'random'; choose one of: gradient, update"),
    (dict(momentum=1.0), r"--momentum must be in \[0, 1\)"),
    (dict(nesterov=True), "--nesterov needs a positive --momentum"),
    (dict(optimizer="adam", momentum=0.9), "--momentum and --nesterov apply to --optimizer sgd; adam's momentum is "
                                           "--adam-beta1"),
    (dict(adam_beta1=0.5), "--adam-beta1 apply to --optimizer adam or adamw, not sgd"),
    (dict(weight_decay=-1.0), "--weight-decay must be a non-negative number"),
    (dict(lr_schedule="step"), "--lr-schedule step needs --lr-decay-every N"),
    (dict(lr_decay_every=5), "--lr-decay-every applies to --lr-schedule step, not constant"),
    (dict(batch_size=-1), "--batch-size must be a non-negative integer"),
    (dict(eval_every=0), "--eval-every must be a positive integer"),
    (dict(sharpness_every=-2), "--sharpness-every must be a non-negative integer"),
])
def test_bad_optimizer_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**options)
