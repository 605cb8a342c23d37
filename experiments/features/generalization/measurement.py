"""Sharpness versus generalisation (experiments/features/generalization/compute.py): every measure on a fixed sample in
running BN mode at initialisation, every ``--generalization-every`` passes, at the end and where the target is reached
(0 = off); and training to a target loss: ``--target-train-loss`` stops the run at the first evaluation whose
training loss is at most it, with a ``target`` record saying whether it was reached (0 = train every epoch)."""
from __future__ import annotations

import math

from experiments.features.base import Measurement, Option, Record, RunContext, every, positive_int

FIELDS = ("n_samples", "base_loss", "worst_case_sharpness", "average_case_sharpness", "average_case_sharpness_stderr",
          "epsilon_sharpness", "pacbayes_flatness", "pacbayes_sigma", "pacbayes_mag_flatness", "pacbayes_mag_sigma",
          "relative_flatness", "lambda_max", "hessian_trace", "distance_to_init", "spectral_product_log", "path_norm")


def _reached(ctx: RunContext) -> bool:
    target = ctx.cfg.target_train_loss
    return bool(target) and ctx.last_eval is not None and ctx.last_eval["train_loss"] <= target


def _hooks(ctx: RunContext):
    from experiments.features.generalization import compute as generalization
    from experiments.loop import Hook, StopTraining
    cfg = ctx.cfg
    hooks = []
    if cfg.generalization_every:
        idx = ctx.order[:cfg.generalization_samples]

        def measure(state):
            epoch = ctx.epoch_of(state.step)
            if not (generalization.due(cfg.generalization_every, epoch, cfg.epochs) or _reached(ctx)):
                return None
            with ctx.timer("generalization"):
                return ctx.at(state.step, generalization.measure(
                    ctx.model, (ctx.x_train[idx], ctx.y_train[idx]), ctx.loss_fn, ctx.init_state,
                    ctx.data.input_shape))

        hooks.append(Hook("generalization", ctx.per_eval, "point", measure, timed=False,
                          what="a generalisation measurement"))
    if cfg.target_train_loss:
        def target(state):
            reached = _reached(ctx)
            if reached or state.step == ctx.total:
                ctx.emit({"kind": "target", "step": state.step, "epoch": ctx.epoch_of(state.step), "reached": reached,
                          "target": cfg.target_train_loss, "train_loss": ctx.last_eval["train_loss"]})
            if reached:  # before the checkpoint: a resume replays from the last one and stops here again
                raise StopTraining(state.step)

        hooks.append(Hook("target", ctx.per_eval, "point", target, timed=False))
    return hooks


def _non_negative_loss(value):
    return None if math.isfinite(value) and value >= 0 else "must be a non-negative number (0 = train all --epochs)"


GENERALIZATION = Measurement(
    name="generalization",
    schedule="at initialisation, every --generalization-every passes, at the end and at the target (0 = off)",
    options=(Option("target_train_loss", float, 0.0,
                    "stop at the first evaluation whose training loss is at most this (0 = train every epoch); a "
                    "'target' record says whether the run reached it", check=_non_negative_loss),
             Option("generalization_every", int, 0,
                    "sharpness/flatness/norm measures of sharpness vs generalisation (experiments.features.generalization.compute) at "
                    "init, every E epochs and at the end (0 = off)", check=every),
             Option("generalization_samples", int, 1000, "fixed training images the generalisation measures use",
                    check=positive_int)),
    records=(Record("generalization", numbers=FIELDS, bn_mode="running"),
             Record("target", numbers=("target", "train_loss"))),
    hooks=_hooks)
