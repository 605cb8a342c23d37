"""RunConfig / StudyConfig: validation names the option, ids are stable hashes of what changes the numbers."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import smoothness
from experiments.config import ConfigError, RunConfig, StudyConfig

PINNED_DEFAULT_RUN_ID = "convnet-lr0.04-s0-955fbc57e843"  # RunConfig().run_id before coercion existed


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


# -- issue 10 item 3: the run id is a function of the computation, not of how a value was spelled ---------------
@pytest.mark.parametrize("field,spelled,canonical", [
    ("lr", 1, 1.0), ("subset", 1, 1.0), ("probe_min", 1, 1.0), ("probe_max", 4, 4.0),
    ("epochs", 3.0, 3), ("seed", 2.0, 2), ("batch_size", np.int64(16), 16), ("lr", np.float32(0.5), 0.5),
])
def test_numbers_are_coerced_to_their_declared_type(field, spelled, canonical):
    a, b = RunConfig(**{field: spelled}), RunConfig(**{field: canonical})
    assert a.run_id == b.run_id and a.config_hash == b.config_hash
    assert type(getattr(a, field)) is type(canonical) and getattr(a, field) == canonical
    from_json = RunConfig.from_dict(json.loads(json.dumps({field: getattr(a, field)})))
    assert from_json == a


@pytest.mark.parametrize("field,value,needle", [
    ("naive_init", "false", "--naive-init must be true or false, got 'false' (a str)"),
    ("naive_init", 0, "--naive-init must be true or false, got 0"),
    ("tensorboard", "yes", "--tensorboard must be true or false"),
    ("epochs", 3.5, "--epochs must be an integer, got 3.5"),
    ("seed", True, "--seed must be an integer, got True (a bool)"),
    ("seed", "1", "--seed must be an integer, got '1' (a str)"),
    ("lr", "abc", "--lr must be a number, got 'abc' (a str)"),
    ("lr", None, "--lr must be a number, got None"),
    ("subset", False, "--subset must be a number, got False (a bool)"),
    ("model", 3, "--model must be a string, got 3"),
    ("norm", ["l2"], "--norm must be a string"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_option(field, value, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{field: value})
    assert needle in str(err.value)
    with pytest.raises(ConfigError, match=needle.split(",")[0]):
        RunConfig.from_dict({field: value})


def test_study_grids_coerce_and_check_their_values():
    assert StudyConfig(lrs=(1,), seeds=(0.0,)).runs() == StudyConfig(lrs=(1.0,), seeds=(0,)).runs()
    with pytest.raises(ConfigError, match="twice"):
        StudyConfig(lrs=(1, 1.0))
    with pytest.raises(ConfigError, match="--seeds must be an integer, got 'a'"):
        StudyConfig(seeds=("a",))
    with pytest.raises(ConfigError, match="--lrs must be a list"):
        StudyConfig(lrs="0.1")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        RunConfig.from_dict([1, 2])


def test_canonical_configs_keep_their_run_ids():
    """Coercion changes nothing for a config that was already written with the declared types: every committed
    result's config.json still gives its own run id (the hash format is unchanged)."""
    configs = sorted(Path(__file__).parents[2].glob("results/*/*/config.json"))
    if not configs:
        pytest.skip("no committed results in this checkout")
    for path in configs:
        saved = json.loads(path.read_text())
        cfg = RunConfig.from_dict(saved)
        assert (cfg.run_id, cfg.config_hash) == (saved["run_id"], saved["config_hash"]) == (
            path.parent.name, cfg.run_id[-12:]), path
    # and a pinned id, computed by the code before coercion existed, for the defaults
    assert RunConfig().run_id == PINNED_DEFAULT_RUN_ID


def test_steps_per_epoch_has_one_home():
    cfg = RunConfig(batch_size=32, epochs=3)
    assert [cfg.steps_per_epoch(n) for n in (1, 16, 17, 48, 49, 6000)] == [1, 1, 1, 2, 2, 188]
    assert cfg.total_steps(6000) == 3 * 188


def test_bn_modes_come_from_the_estimators():
    import experiments.config as config
    assert not hasattr(config, "BN_MODES")
    with pytest.raises(ConfigError, match=", ".join(smoothness.BN_MODES)):
        RunConfig(probe_bn_mode="train")


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


def test_spectrum_schedule_must_fall_on_evaluation_points():
    with pytest.raises(ConfigError, match="--spectrum-every .* multiple of --eval-every"):
        RunConfig(spectrum_every=2, eval_every=3)
    assert RunConfig(spectrum_every=6, eval_every=3).spectrum_every == 6


# -- issue 20 item 4: options that a run cannot honour are refused, naming the bound ---------------------------------
@pytest.mark.parametrize("tol", [2.0, 0.11, 1.0])
def test_sharpness_tolerance_is_at_most_a_tenth(tol):
    with pytest.raises(ConfigError, match=r"--sharpness-tol must be in \(0, 0.1\], got "):
        RunConfig(sharpness_tol=tol)
    assert RunConfig(sharpness_tol=0.1).sharpness_tol == 0.1


@pytest.mark.parametrize("options, n_train, message", [
    (dict(batch_size=100_000), 20, "--batch-size 100000 is larger than the training subset (20 images of "
                                   "fashion-mnist at --subset 0.1); use --batch-size 20 or less, or --batch-size full"),
    (dict(batch_size=21, sampling="shuffle"), 20, "--batch-size 21 is larger than the training subset (20 images"),
    (dict(warmup_steps=60, epochs=2), 960, "--warmup-steps 60 is not shorter than the run, which has 60 steps "
                                           "(2 epochs x 30); use at most 59, or more --epochs"),
    (dict(warmup_steps=1, batch_size=0, epochs=1), 20, "--warmup-steps 1 is not shorter than the run, which has 1"),
])
def test_options_that_do_not_fit_the_training_subset(options, n_train, message):
    cfg = RunConfig(**options)                  # the size of the subset is known only once the data is loaded
    with pytest.raises(ConfigError) as err:
        cfg.check_training_set(n_train)
    assert message in str(err.value)
    RunConfig(batch_size=20).check_training_set(20)
    RunConfig(warmup_steps=59, epochs=2).check_training_set(960)
