"""Every preset study (experiments/presets.py) starts and runs one SGD step, for each of its models.

Each case takes the preset's own RunConfig (``study.runs()``, first lr and seed of that model) and shrinks only the
amount of work (one pass of one batch of 8, tiny probe / smoothness / sharpness samples, CPU) before handing it to
``experiments.training.train_run``, so the preset's model, norm, dataset, lr and init are what runs.

Data: MNIST-1D is generated locally by the mnist1d package and FashionMNIST is read from its files when installed.
MNIST (and MNIST-32x3), SVHN and CIFAR-10 cannot be downloaded in the test environment, so their entries in
``experiments.data.DATASETS`` are replaced by loaders of synthetic tensors with each loader's raw per-image shape:
MNIST (1, 28, 28) (MNIST-32x3's own transform then pads it to (3, 32, 32)), SVHN and CIFAR-10 (3, 32, 32).
FashionMNIST is faked the same way, at (1, 28, 28), when its files are not installed. To keep evaluation cheap the
test split ``train_run`` evaluates on is cut to 32 images.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from experiments import data, plugins, training
from experiments.cli import main
from experiments.config import ConfigError, RunConfig, StudyConfig
from experiments.normalization import NORMS
from experiments.presets import DESCRIPTIONS, PRESETS, get_preset

OFFLINE = ("mnist", "mnist-32x3", "svhn", "cifar10")  # cannot be had offline: faked below
RAW_SHAPES = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "mnist-32x3": (1, 28, 28),
              "svhn": (3, 32, 32), "cifar10": (3, 32, 32)}
FAKE_SIZES = (64, 32)
BATCH = 8
CASES = [pytest.param(name, spec, id=f"{name}-{spec}")
         for name, study in PRESETS.items() for spec in study.models]


def _fashion_installed() -> bool:
    try:
        data.load_dataset("fashion-mnist", subset=0.001, download=False)
    except data.DataError:
        return False
    return True


def _fake_loader(shape):
    def load(data_dir, download):
        g = torch.Generator().manual_seed(0)
        x = lambda n: torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)  # noqa: E731
        y = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
        return data._Splits(x(FAKE_SIZES[0]), y(FAKE_SIZES[0]), x(FAKE_SIZES[1]), y(FAKE_SIZES[1]),
                            info={"source": "fake for tests"})
    return load


@pytest.fixture(scope="module")
def fashion_installed():
    return _fashion_installed()


@pytest.fixture
def offline_data(monkeypatch, fashion_installed):
    """Synthetic tensors for the datasets that cannot be had offline; a small test split inside train_run."""
    fake = list(OFFLINE) + ([] if fashion_installed else ["fashion-mnist"])
    for name in fake:
        spec = data.DATASETS[name]
        monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(spec, load=_fake_loader(RAW_SHAPES[name])))
    real_load = plugins.load_run_dataset

    def small_test_split(*args, **kwargs):
        d = real_load(*args, **kwargs)
        return dataclasses.replace(d, x_test=d.x_test[:32], y_test=d.y_test[:32])

    monkeypatch.setattr(plugins, "load_run_dataset", small_test_split)
    return fake


def _tiny(cfg: RunConfig) -> RunConfig:
    """The preset's config with the work cut to one step of one batch (everything else kept)."""
    n_full = len(data.DATASETS[cfg.dataset].load(None, False).x_train)
    return dataclasses.replace(cfg, epochs=1, batch_size=BATCH, subset=BATCH / n_full, probe_every=10**6,
                               probe_steps=2, local_smoothness_samples=BATCH, sharpness_samples=4,
                               sharpness_tol=0.1, device="cpu")


@pytest.mark.parametrize("preset, spec", CASES)
def test_preset_runs_one_step(preset, spec, offline_data, tmp_path):
    study = get_preset(preset)
    cfg = study.runs()[study.models.index(spec) * len(study.runs()) // len(study.models)]  # runs(): model-major
    assert (cfg.study, cfg.model, cfg.lr, cfg.seed) == (preset, spec.partition(":")[0], study.lrs[0],
                                                         study.seeds[0])
    tiny = _tiny(cfg) if cfg.probe_every else dataclasses.replace(_tiny(cfg), probe_every=0)
    outcome = training.train_run(tiny, tmp_path)
    assert outcome.status == "done" and outcome.steps == 1, outcome
    kinds = {json.loads(line)["kind"] for line in (outcome.path / "records.jsonl").read_text().splitlines()}
    optional = {"sharpness": cfg.sharpness_every > 0, "spectrum": cfg.spectrum_every > 0,  # preset-specific extras
                "probe": cfg.probe_every > 0, "generalization": cfg.generalization_every > 0,
                "target": cfg.target_train_loss > 0, "per_layer": cfg.per_layer,
                "gradient_noise": cfg.gradient_noise_every > 0,
                "gradient_noise_example": cfg.gradient_noise_every > 0 and cfg.gradient_noise_unit != "batch"
                and cfg.norm in ("none", None)}
    assert kinds == {"eval", "smoothness", "step"} | {k for k, on in optional.items() if on}
    saved = RunConfig.from_dict(json.loads((outcome.path / "config.json").read_text()))
    assert (saved.model, saved.norm, saved.dataset, saved.naive_init) == (cfg.model, cfg.norm, cfg.dataset,
                                                                         cfg.naive_init)


def test_presets_cover_the_seeds():
    assert set(PRESETS) == set(DESCRIPTIONS) >= {"fashion-mnist-bn", "mnist-mlp-bn", "lenet5-bn", "lenet5-bn-svhn",
                                                 "resmlp-variance", "santurkar-vgg", "noisy-bn", "lp-norms"}
    mlp = PRESETS["mnist-mlp-bn"]
    assert mlp.models == ("mlp", "mlp:scratch-fn", "mlp:scratch", "bn-mlp")  # seed 000: none, functional, module, torch
    assert [c.norm for c in mlp.runs() if c.seed == 0] == ["none", "scratch-fn", "scratch", "torch"]
    assert mlp.base.naive_init and mlp.base.dataset == "mnist"
    assert {PRESETS["lenet5-bn"].base.dataset, PRESETS["lenet5-bn-svhn"].base.dataset} == {"mnist-32x3", "svhn"}
    for study in PRESETS.values():
        assert study.runs(), study.name  # every RunConfig validates


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError) as e:
        get_preset("nope")
    assert str(e.value) == f"unknown study 'nope' (--study); choose one of: {', '.join(PRESETS)}"
    result = CliRunner().invoke(main, ["run", "--study", "nope"])
    assert result.exit_code == 1 and "choose one of: fashion-mnist-bn" in result.output


def test_unknown_norm_lists_choices():
    with pytest.raises(ConfigError) as e:
        StudyConfig(models=("convnet:bogus",)).runs()
    assert str(e.value) == f"unknown norm 'bogus' (--norm); choose one of: {', '.join(NORMS)}"
    assert "scratch-fn" in str(e.value)


def test_studies_lists_every_preset_in_aligned_columns():
    result = CliRunner().invoke(main, ["studies"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS)
    columns = {line.index(" runs  ") for line in lines}
    assert len(columns) == 1, f"the run counts are not aligned: {result.output}"
    for line, (name, study) in zip(lines, PRESETS.items()):
        assert line.endswith(DESCRIPTIONS[name]) and f" {len(study.runs())} runs  " in line


def test_study_json_keeps_one_grid_when_later_fields_are_only_defaults(tmp_path):
    """A grid written before RunConfig gained fields (HASHED_WHEN_SET) is the same grid: relaunching the reference
    study must not append it again (it did: `make run` in a fresh clone grew results/fashion-mnist-bn/study.json)."""
    from experiments.cli import _write_study_json
    from experiments.config import HASHED_WHEN_SET

    study = get_preset("fashion-mnist-bn")
    old = study.to_dict()
    old["base"] = {k: v for k, v in old["base"].items() if k not in HASHED_WHEN_SET}
    junk = {"name": "fashion-mnist-bn", "models": "not a list"}
    (tmp_path / "study.json").write_text(json.dumps({"name": study.name, "grids": [old, junk]}))
    assert StudyConfig.from_dict(old) == study
    assert [c.run_id for c in StudyConfig.from_dict(old).runs()] == [c.run_id for c in study.runs()]
    _write_study_json(tmp_path, study)
    assert json.loads((tmp_path / "study.json").read_text())["grids"] == [old, junk]   # untouched, nothing added
    wider = dataclasses.replace(study, seeds=(0, 1, 2, 3, 4, 5))
    _write_study_json(tmp_path, wider)
    assert json.loads((tmp_path / "study.json").read_text())["grids"] == [old, junk, wider.to_dict()]
