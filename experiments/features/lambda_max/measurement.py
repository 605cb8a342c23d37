"""Step-wise sharpness (Cohen et al.'s edge of stability): λ_max of the train-mode Hessian on a fixed training
sample every ``--sharpness-every`` steps (0 = off), once the step's gradient is known, with the optimizer's stability
threshold at the step's learning rate and, for Adam/AdamW, λ_max(P⁻¹H) with the preconditioner of the step about to
be taken. The sample, the tolerance and the warm start are shared with the per-pass sharpness (smoothness.py)."""
from __future__ import annotations

from experiments.features.base import Measurement, Option, Record, RunContext, every, non_negative

STARTS = ("cold", "warm")
# Lanczos stops when the residual is at most tol x the eigenvalue (smoothness.lanczos), which bounds the sharpness's
# error by about that fraction: beyond 10% the number is no longer a measurement (tol 2 gave 19.1 for 33.1).
MAX_TOL = 0.1


def _tol(value):
    if not value > 0:
        return "must be a positive number"
    if value <= MAX_TOL:
        return None
    return (f"must be in (0, {MAX_TOL:g}], {{got}}: it is the Lanczos residual relative to the eigenvalue, so the "
            f"sharpness is only known to within about that fraction (the default 0.001 gives 0.1%)")


def sample(ctx: RunContext):
    """(the fixed sharpness batch, the run's WarmStart), made once per run and shared by both sharpness records; the
    warm start's vectors go into checkpoints under "sharpness_start"."""
    if "sharpness" not in ctx.shared:
        from experiments.features.lambda_max import compute
        cfg = ctx.cfg
        idx = ctx.order[:cfg.sharpness_samples] if cfg.sharpness_samples else ctx.order
        batch = compute.sharpness_batch(ctx.model, ctx.x_train[idx], ctx.y_train[idx])
        warm = compute.WarmStart(cfg.sharpness_start == "warm")
        ctx.shared["sharpness"] = (batch, warm)
        ctx.checkpointed["sharpness_start"] = (warm.get_state, warm.set_state)
    return ctx.shared["sharpness"]


def _hooks(ctx: RunContext):
    from experiments import optim
    from experiments.features.lambda_max import compute
    from experiments.loop import Hook
    cfg = ctx.cfg
    if not cfg.sharpness_every:
        return ()
    batch, warm = sample(ctx)

    def sharpness(state):
        lr = optim.current_lr(ctx.optimizer)
        threshold = optim.stability_threshold(cfg.optimizer, lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                              beta1=cfg.adam_beta1)
        pre = ctx.lookahead(state).preconditioner if cfg.optimizer in ("adam", "adamw") else None
        rec = compute.sharpness_record(ctx.model, batch, cfg.sharpness_tol, threshold=threshold, lr=lr,
                                        preconditioner=pre, loss_fn=ctx.loss_fn, warm=warm)
        return ctx.at(state.step, rec)

    return (Hook("sharpness", cfg.sharpness_every, "gradient", sharpness, what="a sharpness measurement"),)


SHARPNESS = Measurement(
    name="sharpness", schedule="every --sharpness-every steps (0 = off), after the backward pass of that step",
    options=(Option("sharpness_every", int, 0,
                    "steps between sharpness records, with the optimizer's stability threshold (0 = off; the "
                    "per-pass sharpness is --pass-sharpness)", check=every),
             Option("sharpness_samples", int, 256,
                    "fixed training images for the top Hessian eigenvalue (0 = the whole subset)", check=non_negative,
                    hashed="always"),
             Option("sharpness_tol", float, 1e-3, f"relative tolerance of the sharpness (Lanczos), in (0, {MAX_TOL:g}]",
                    check=_tol, hashed="always"),
             Option("sharpness_start", str, "cold",
                    "start each sharpness measurement from a random vector (cold) or from the previous measurement's "
                    "top eigenvector (warm: fewer Hessian-vector products along training)", choices=STARTS)),
    records=(Record("sharpness", numbers=("sharpness", "sharpness_n_hvp", "samples", "lr", "stability_threshold",
                                          "preconditioned_sharpness", "preconditioned_n_hvp")),),
    hooks=_hooks)
