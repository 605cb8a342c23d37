"""Gradient noise and step quality every ``--gradient-noise-every`` steps (0 = off), once the step's gradient is
known: the norm, inner-product and orthogonality tests, the mean GSNR, the simple noise scale and the step quality α
of the update the optimizer is about to make (docs/METHODS.md §12), on a fixed sample of the training subset.

The sample is the first ``--gradient-noise-batches`` × ``--batch-size`` images of the run's fixed permutation, cut
into that many minibatches of the run's batch size. ``--gradient-noise-unit``: ``batch`` takes each minibatch's
gradient (BatchNorm in batch mode inside it: the gradient the optimizer uses) as a unit; ``example`` takes each
image's gradient (defined only without batch-coupled normalisation; with it the record is skipped); ``auto``
(default) is ``example`` where it is defined and ``batch`` otherwise; ``both`` writes a record of each unit that is
defined. α is evaluated at both ends of the step on the same sample (Cockpit takes its end point on the next
minibatch). Each unit has its own record kind, ``gradient_noise`` (minibatch units) and ``gradient_noise_example``
(example units), so that no table or mean mixes them. The measurement draws nothing from the run's generators and leaves the model as it found it, so the
training trajectory is the same with or without it."""
from __future__ import annotations

from experiments.features.base import Measurement, Metric, Option, Record, RunContext, every, positive_int

UNITS = ("auto", "example", "batch", "both")
FIELDS = ("n_units", "unit_size", "gradient_norm", "norm_test", "inner_product_test", "orthogonality_test", "gsnr",
          "noise_scale", "signal_estimate", "alpha", "step_length", "base_loss", "tic_diag", "tic_trace",
          "histogram_low", "histogram_high", "histogram_below", "histogram_above")
LISTS = ("histogram_counts",)


def _hooks(ctx: RunContext):
    from experiments.loop import Hook
    cfg = ctx.cfg
    if not cfg.gradient_noise_every:
        return ()
    from experiments.features.gradient_noise import compute
    batches = compute.fixed_minibatches(ctx.x_train, ctx.y_train, ctx.order, cfg.gradient_noise_batches,
                                        cfg.batch_size or len(ctx.order))
    units = compute.units_for(ctx.model, cfg.gradient_noise_unit)

    def measure(state):
        step = ctx.lookahead(state).update    # the update the optimizer is about to make
        with ctx.timer("gradient_noise"):
            return [ctx.at(state.step, rec) for rec in compute.records(ctx.model, ctx.loss_fn, batches, units, step)]

    return (Hook("gradient_noise", cfg.gradient_noise_every, "gradient", measure, timed=False,
                 what="a gradient-noise measurement"),)


def _check(cfg):
    if cfg.gradient_noise_every and not cfg.batch_size:
        return ("--gradient-noise-every measures the noise of minibatch gradients; full-batch gradient descent "
                "(--batch-size full) has none")
    if cfg.gradient_noise_every and cfg.gradient_noise_batches < 2:
        return "--gradient-noise-batches must be at least 2: variances over units need two of them"
    return None


GRADIENT_NOISE = Measurement(
    name="gradient_noise", schedule="every --gradient-noise-every steps (0 = off), once the step's gradient is known",
    check=_check,
    options=(Option("gradient_noise_every", int, 0,
                    "steps between gradient-noise records: norm/inner-product/orthogonality tests, GSNR, noise scale "
                    "and the step quality alpha of the update (0 = off)", check=every),
             Option("gradient_noise_unit", str, "auto",
                    "gradient-noise units: example (per-image gradients; not with BatchNorm in batch mode), batch "
                    "(minibatch gradients), auto (example where defined, else batch) or both", choices=UNITS),
             Option("gradient_noise_batches", int, 8,
                    "minibatches of --batch-size images in the fixed gradient-noise sample", check=positive_int)),
    records=(Record("gradient_noise", numbers=FIELDS, number_lists=LISTS),
             Record("gradient_noise_example", numbers=FIELDS, number_lists=LISTS)),
    hooks=_hooks,
    metrics=(Metric("gsnr_median", "mean GSNR of minibatch gradients, median over measurements", "gradient_noise",
                    "gsnr", "median"),
             Metric("norm_test_median", "norm test θ over minibatches, median over measurements", "gradient_noise",
                    "norm_test", "median"),
             Metric("noise_scale_median", "simple noise scale B_simple (minibatch units), median over the measurements "
                    "where it is finite",
                    "gradient_noise", "noise_scale", "median"),
             Metric("alpha_median", "step quality α of the update (minibatch units), median over measurements",
                    "gradient_noise", "alpha", "median")))
