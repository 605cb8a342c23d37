"""The per-pass smoothness record, at every evaluation point: seed 003's local smoothness ‖∇f(w+u) − ∇f(w)‖ / ‖u‖
with u = −η·(a minibatch gradient), η the optimizer's current step size (the scheduled rate), f the train-mode loss
on a fixed sample (``--pass-local-smoothness``), and the top Hessian eigenvalue on the sharpness sample
(``--pass-sharpness``).

Runs published before ``--pass-sharpness`` existed measured the per-pass sharpness exactly when ``--sharpness-every``
was 0; a config without the option means that (``legacy_rule``), and the option enters the run id only when it differs.
"""
from __future__ import annotations

from experiments.features.base import Measurement, Metric, Option, Record, RunContext, non_negative
from experiments.features.lambda_max.measurement import sample


def _hooks(ctx: RunContext):
    from experiments import optim
    from experiments.features.lambda_max.compute import sharpness
    from experiments.features.local_smoothness.compute import local_smoothness
    from experiments.loop import Hook
    cfg = ctx.cfg
    if not (cfg.pass_local_smoothness or cfg.pass_sharpness):
        return ()
    x, y = ctx.x_train, ctx.y_train
    full = (x, y) if not cfg.local_smoothness_samples else (x[ctx.order[:cfg.local_smoothness_samples]],
                                                            y[ctx.order[:cfg.local_smoothness_samples]])
    sharp = sample(ctx) if cfg.pass_sharpness else None

    def measure(state):
        import torch
        rec = {"kind": "smoothness", "step": state.step, "epoch": ctx.epoch_of(state.step), "bn_mode": "batch"}
        if cfg.pass_local_smoothness:
            with ctx.timer("local_smoothness"):
                if cfg.batch_size:
                    mb = torch.randint(x.shape[0], (cfg.batch_size,), generator=ctx.sampler).to(x.device)
                    minibatch = (x[mb], y[mb])
                else:  # full-batch GD: u = −η·(the full gradient), the step GD takes
                    minibatch = (x, y)
                lr = optim.current_lr(ctx.optimizer)
                # η = 0 (a cosine schedule's end) takes no step: there is nothing to measure
                rec["local_smoothness"] = (local_smoothness(ctx.model, minibatch, full, lr, ctx.loss_fn)
                                           if lr > 0 else None)
        if cfg.pass_sharpness:
            with ctx.timer("sharpness"):
                eig = sharpness(ctx.model, sharp[0], cfg.sharpness_tol, ctx.loss_fn, warm=sharp[1])
            rec.update(sharpness=eig.values[0], sharpness_n_hvp=eig.n_hvp)
        return rec

    return (Hook("smoothness", ctx.per_eval, "point", measure, timed=False, what="a smoothness measurement"),)


SMOOTHNESS = Measurement(
    name="smoothness", schedule="at initialisation, every --eval-every passes and at the end",
    options=(Option("pass_local_smoothness", bool, True, "local smoothness at every evaluation"),
             Option("local_smoothness_samples", int, 2000,
                    "training images for the per-pass local smoothness (0 = the whole subset)", check=non_negative,
                    hashed="always"),
             Option("pass_sharpness", bool, True,
                    "sharpness (top Hessian eigenvalue) at every evaluation [runs saved without this option: on "
                    "iff --sharpness-every is 0]",
                    legacy_rule=lambda values: values.get("sharpness_every", 0) == 0)),
    records=(Record("smoothness", numbers=("local_smoothness", "sharpness", "sharpness_n_hvp")),),
    hooks=_hooks,
    metrics=(Metric("final_sharpness", "final sharpness λ_max(∇²L)", "smoothness", "sharpness", "last"),
             Metric("final_local_smoothness", "final local smoothness ‖∇f(w+u) − ∇f(w)‖₂ / ‖u‖₂",
                    "smoothness", "local_smoothness", "last")))
