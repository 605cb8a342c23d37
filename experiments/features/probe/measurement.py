"""Santurkar et al.'s line probe every ``--probe-every`` steps on the step's own batch: the loss and gradient along
d = −g (before the backward pass) or along the optimizer's own update Δw/η (``--probe-direction update``, once the
gradient is known), at K step sizes evenly spaced in [probe_min, probe_max] × the step's scheduled learning rate."""
from __future__ import annotations

from experiments.features.base import Measurement, Metric, Option, Record, RunContext, every, positive, positive_int

DIRECTIONS = ("gradient", "update")


def _hooks(ctx: RunContext):
    from experiments import optim
    from experiments.features.probe import compute
    from experiments.loop import Hook
    cfg = ctx.cfg

    def probe(state):
        lr = optim.current_lr(ctx.optimizer)
        direction = None
        if cfg.probe_direction == "update":  # d = Δw/η: the step sizes stay multiples of η, and s = η is the step
            step = ctx.lookahead(state)
            direction = {name: u / step.lr for name, u in step.update.items()}
        rec = compute.probe_record(ctx.model, state.batch, cfg.step_sizes_at(lr), cfg.probe_bn_mode,
                                    direction=direction, loss_fn=ctx.loss_fn)
        return ctx.at(state.step, rec)

    when = "before" if cfg.probe_direction == "gradient" else "gradient"
    return (Hook("probe", cfg.probe_every, when, probe, what="a line probe"),)


def _check(cfg):
    if cfg.probe_min > cfg.probe_max:
        return f"--probe-min ({cfg.probe_min}) must not exceed --probe-max ({cfg.probe_max})"
    return None


PROBE = Measurement(
    name="probe", schedule="every --probe-every steps, on the step's batch", check=_check,
    options=(Option("probe_every", int, 10, "line probe every N SGD steps (0 = off)", check=every, hashed="always"),
             Option("probe_steps", int, 8, "number K of step sizes in a line probe", check=positive_int,
                    hashed="always"),
             Option("probe_min", float, 0.5, "smallest probe step, in units of lr", check=positive, hashed="always"),
             Option("probe_max", float, 4.0, "largest probe step, in units of lr", check=positive, hashed="always"),
             Option("probe_bn_mode", str, "batch", "BatchNorm mode of the line probes", choices=("batch", "running"),
                    hashed="always"),
             Option("probe_direction", str, "gradient",
                    "line probes along d = -gradient (Santurkar) or along the optimizer's actual update",
                    choices=DIRECTIONS)),
    records=(Record("probe", numbers=("base_loss", "grad_norm", "loss_min", "loss_max", "grad_pred_min",
                                      "grad_pred_max", "effective_beta"),
                    number_lists=("step_sizes", "losses", "grad_diff_norms")),),
    hooks=_hooks,
    metrics=(Metric("effective_beta_median", "effective β, median over probes", "probe", "effective_beta", "median"),
             Metric("effective_beta_p90", "effective β, 90th percentile over probes", "probe", "effective_beta",
                    "p90"),
             Metric("loss_range_width", "loss range width, median over probes of loss_max − loss_min", "probe",
                    "loss_max-loss_min", "median"),
             Metric("grad_predictiveness", "gradient predictiveness, median over probes of grad_pred_max", "probe",
                    "grad_pred_max", "median")))
