"""Write fake study directories with hand-set numbers, following results/README.md exactly.

Every number is a closed-form function of (model level, seed, step), so tests can recompute expected summaries with
numpy/scipy straight from ``FakeRun.records`` (the exact dicts written) without going through the analysis code.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LEVELS = {"convnet": 1.0, "bn-convnet": 0.55}


@dataclass
class FakeRun:
    run_id: str
    model: str
    seed: int
    lr: float
    status: str
    path: Path
    records: list = field(default_factory=list)


@dataclass
class FakeStudy:
    path: Path
    runs: list

    def run(self, model: str, seed: int, lr: float | None = None) -> FakeRun:
        return next(r for r in self.runs if r.model == model and r.seed == seed and (lr is None or r.lr == lr))


def _records(level: float, seed: int, lr: float, epochs: int, spe: int, probe_every: int, stop: int | None):
    """Records in the order a run appends them; ``stop`` = step at which the loss becomes non-finite."""
    total = epochs * spe
    # a model x seed interaction, so that paired differences vary from seed to seed as they do in real runs
    wob = math.sin(1.7 * seed + 5.3 * level)
    sizes = [round(lr * (0.5 + 0.5 * k), 6) for k in range(8)]
    out = []
    for t in range(total + 1):
        if t % spe == 0:
            e = t // spe
            out.append({"kind": "eval", "step": t, "epoch": e, "bn_mode": "running",
                        "train_loss": round(2.3 * level * 0.8 ** e + 0.021 * seed + 0.01 * wob, 6),
                        "train_accuracy": round(0.6 + 0.05 * e, 6),
                        "test_loss": round(2.4 * level * 0.8 ** e + 0.03 * seed + 0.02 * wob, 6),
                        "test_accuracy": round(0.7 + 0.04 * e - 0.1 * level + 0.013 * seed + 0.005 * wob, 6)})
            out.append({"kind": "smoothness", "step": t, "epoch": e, "bn_mode": "batch",
                        "local_smoothness": round(4 * level * (1 - 0.1 * e) + 0.07 * seed + 0.05 * wob, 6),
                        "sharpness": round(20 * level + 5 * e + 0.9 * seed + 0.7 * wob, 6), "sharpness_n_hvp": 20})
        if t == total:
            break
        e = t // spe
        if t == stop:
            out.append({"kind": "step", "step": t, "epoch": e, "bn_mode": "batch", "loss": None, "accuracy": 0.1})
            out.append({"kind": "diverged", "step": t, "epoch": e, "bn_mode": "batch", "loss": None,
                        "reason": "loss is not finite"})
            break
        loss = round(2.3 * level * math.exp(-t / total) + 0.01 * ((7 * t + seed) % 5), 6)
        out.append({"kind": "step", "step": t, "epoch": e, "bn_mode": "batch", "loss": loss,
                    "accuracy": round(min(1.0, 0.1 + t / total), 6)})
        if t % probe_every == 0:
            j = t // probe_every
            lmin = round(loss * (1 - 0.1 * level), 6)
            lmax = round(loss * (1 + 0.2 * level) + 0.01 * (j % 3) + 0.005 * wob, 6)
            gmax = round(level * (1 + 0.05 * (j % 4)) + 0.02 * seed + 0.02 * wob, 6)
            beta = round(10 * level * (1 + 0.1 * (j % 3)) + 0.3 * seed + 0.2 * wob, 6)
            out.append({"kind": "probe", "step": t, "epoch": e, "bn_mode": "batch", "base_loss": loss,
                        "grad_norm": round(level * 1.5, 6), "loss_min": lmin, "loss_max": lmax,
                        "grad_pred_min": round(0.1 * level, 6), "grad_pred_max": gmax, "effective_beta": beta,
                        "step_sizes": sizes, "losses": [lmin] * 7 + [lmax], "grad_diff_norms": [gmax] * 8})
    return out


def make_results(root, models=("convnet", "bn-convnet"), seeds=(0, 1, 2), values=None, diverged=(), unfinished=(),
                 lrs=(0.04,), epochs=3, steps_per_epoch=10, probe_every=2, study="fake-study",
                 loss=None) -> FakeStudy:
    """Write ``root/study/<run-id>/`` for every (model, lr, seed).

    values: {model: level} scaling every metric (default DEFAULT_LEVELS, 0.8 for other models).
    diverged / unfinished: (model, seed) or (model, seed, lr) tuples. A diverged run stops half-way with a
    ``diverged`` record and still writes ``done``; an unfinished run stops half-way without ``done`` and leaves a
    truncated last line, as a killed run does. loss: the config's "loss" (absent = cross-entropy, as old runs).
    """
    values = {**DEFAULT_LEVELS, **(values or {})}
    study_dir = Path(root) / study
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.json").write_text(json.dumps({"models": list(models), "seeds": list(seeds),
                                                      "lrs": list(lrs)}))
    (study_dir / "figures").mkdir(exist_ok=True)
    total = epochs * steps_per_epoch

    def flagged(spec, model, seed, lr):
        return any(s[:2] == (model, seed) and (len(s) == 2 or s[2] == lr) for s in spec)

    runs = []
    for model in models:
        for lr in lrs:
            for seed in seeds:
                name, _, norm = model.partition(":")  # "convnet:noisy": a norm variant, as studies write it
                config = {"study": study, "model": name, "dataset": "fake-mnist",
                          "norm": norm or ("torch" if name.startswith("bn-") else "none"), "seed": seed, "lr": lr,
                          "batch_size": 32, "epochs": epochs, "subset": 320, "sampling": "with-replacement",
                          "probe_every": probe_every, "probe_steps": 8, "probe_min": 0.5, "probe_max": 4.0,
                          "sharpness_samples": 64, **({"loss": loss} if loss else {})}
                digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
                run_id = f"{model.replace(':', '-')}-lr{lr}-s{seed}-{digest}"
                config = {"run_id": run_id, **config, "device": "cpu"}
                is_div, is_unf = flagged(diverged, model, seed, lr), flagged(unfinished, model, seed, lr)
                stop = total // 2 + 1 if is_div else None
                records = _records(values.get(model, 0.8) * (lr / 0.04) ** 0.5, seed, lr, epochs,
                                   steps_per_epoch, probe_every, stop)
                if is_unf:
                    records = [r for r in records if r["step"] < total // 2 + 3]
                d = study_dir / run_id
                (d / "checkpoints").mkdir(parents=True)
                (d / "config.json").write_text(json.dumps(config, indent=2))
                text = "".join(json.dumps(r) + "\n" for r in records)
                if is_unf:
                    text += '{"kind": "step", "step": 1'
                (d / "records.jsonl").write_text(text)
                (d / "timing.json").write_text(json.dumps({"train": 1.0, "probe": 0.5, "eval": 0.2,
                                                           "local_smoothness": 0.1, "sharpness": 0.3,
                                                           "checkpoint": 0.01, "total": 2.11}))
                if not is_unf:
                    (d / "done").write_text("")
                status = "diverged" if is_div else "unfinished" if is_unf else "done"
                runs.append(FakeRun(run_id, model, seed, lr, status, d, records))
    return FakeStudy(study_dir, runs)
