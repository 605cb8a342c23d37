"""A noisy-BatchNorm run's training does not depend on what is measured along the way (issue 9, section 2).

Noisy BatchNorm draws its noise from torch's global generator at every training step. Before the estimators fixed
and restored the generator, each line probe, local-smoothness or sharpness measurement advanced it, so changing
``--probe-every`` or ``--sharpness-samples`` changed every later SGD step of the `noisy-bn` study.
"""
import json

import pytest

from experiments.config import RunConfig
from experiments.training import train_run

BASE = dict(model="bn-convnet", norm="noisy", dataset="synthetic", subset=0.2, epochs=1, batch_size=32,
            probe_steps=3, local_smoothness_samples=64, seed=3)


def run(tmp_path, **options):
    outcome = train_run(RunConfig(**{**BASE, **options}), tmp_path)
    assert outcome.status == "done"
    return [json.loads(line) for line in (outcome.path / "records.jsonl").read_text().splitlines()]


def of_kind(records, kind):
    return [r for r in records if r["kind"] == kind]


def test_noisy_bn_training_independent_of_probe_and_sharpness_settings(tmp_path):
    probed = run(tmp_path, probe_every=5, sharpness_samples=32)
    unprobed = run(tmp_path, probe_every=0, sharpness_samples=32)
    whole_subset_sharpness = run(tmp_path, probe_every=2, sharpness_samples=0)
    steps = of_kind(probed, "step")
    assert len(steps) == round(400 / 32) and len(of_kind(probed, "probe")) == 3  # steps 0, 5, 10
    assert len(of_kind(unprobed, "probe")) == 0 and len(of_kind(whole_subset_sharpness, "probe")) == 6  # 0, 2, ..., 10
    for other in (unprobed, whole_subset_sharpness):
        assert of_kind(other, "step") == steps  # every step's loss and accuracy, exactly
        assert of_kind(other, "eval") == of_kind(probed, "eval")
        assert [r["local_smoothness"] for r in of_kind(other, "smoothness")] == \
            [r["local_smoothness"] for r in of_kind(probed, "smoothness")]
    # the measurements themselves repeat exactly where both runs made them
    assert of_kind(probed, "probe")[0] == of_kind(whole_subset_sharpness, "probe")[0]
    assert [r["sharpness"] for r in of_kind(probed, "smoothness")] == \
        [r["sharpness"] for r in of_kind(unprobed, "smoothness")]
    assert all(r["sharpness"] > 0 for r in of_kind(probed, "smoothness"))


def test_noise_reaches_training(tmp_path):
    """The test above is not vacuous: the same run with plain BatchNorm takes different steps."""
    noisy = of_kind(run(tmp_path, probe_every=0, sharpness_samples=0), "step")
    plain = of_kind(run(tmp_path, probe_every=0, sharpness_samples=0, norm="scratch"), "step")
    assert [r["loss"] for r in noisy] != pytest.approx([r["loss"] for r in plain], rel=1e-3)
