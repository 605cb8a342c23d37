"""The Hessian spectrum (experiments/features/spectrum/compute.py): eigenvalue density, top-10 eigenvalues and gradient concentration
at initialisation, every ``--spectrum-every`` passes and after the last, in both BN modes (0 = off)."""
from __future__ import annotations

from experiments.features.base import Measurement, Option, Record, RunContext, every


def _hooks(ctx: RunContext):
    from experiments.features.spectrum import compute as spectrum
    from experiments.loop import Hook
    cfg = ctx.cfg
    if not cfg.spectrum_every:
        return ()
    idx = ctx.order[:spectrum.SAMPLES]

    def measure(state):
        epoch = ctx.epoch_of(state.step)
        if not spectrum.due(cfg.spectrum_every, epoch, cfg.epochs):
            return None
        with ctx.timer("spectrum"):
            return [ctx.at(state.step, rec) for rec in spectrum.measure(
                ctx.model, (ctx.x_train[idx], ctx.y_train[idx]), cfg.norm, ctx.loss_fn)]

    return (Hook("spectrum", ctx.per_eval, "point", measure, timed=False, what="a spectrum measurement"),)


def _check(cfg):
    if cfg.spectrum_every and cfg.spectrum_every % cfg.eval_every:
        return (f"--spectrum-every ({cfg.spectrum_every}) must be a multiple of --eval-every ({cfg.eval_every}): the "
                f"spectrum is measured at evaluation points")
    return None


SPECTRUM = Measurement(
    name="spectrum", schedule="at initialisation, every --spectrum-every passes and after the last (0 = off)",
    check=_check,
    options=(Option("spectrum_every", int, 0,
                    "Hessian eigenvalue density, top-10 eigenvalues and gradient concentration at init and every E "
                    "epochs, in both BN modes (0 = off; about 3 min per measurement and mode on one core)",
                    check=every),),
    records=(Record("spectrum", numbers=("lambda_max", "lambda_k", "gradient_concentration", "mean_eigenvalue",
                                         "grad_norm", "loss", "top_k", "samples", "n_params", "n_probes", "n_steps",
                                         "density_n_hvp", "concentration_n_hvp"),
                    number_lists=("top_eigenvalues",), bn_mode="both",
                    strings=("bn_mode",), integers=("epoch", "samples", "n_params", "n_steps"),
                    number_matrices=("nodes", "weights")),),
    hooks=_hooks)
