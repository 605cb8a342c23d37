"""Per-layer curvature (experiments/features/per_layer/compute.py): at every evaluation, on the sharpness's fixed sample, the
top eigenvalue and the Hutchinson trace of each parameterised module's block of the Hessian and of the GGN, and the
whole Hessian's most negative eigenvalue (``--per-layer``; about 10x a sharpness measurement)."""
from __future__ import annotations

from experiments.features.base import Measurement, Option, Record, RunContext
from experiments.features.lambda_max.measurement import sample


def _hooks(ctx: RunContext):
    from experiments.features.per_layer import compute as per_layer
    from experiments.loop import Hook
    if not ctx.cfg.per_layer:
        return ()
    batch = sample(ctx)[0]

    def measure(state):
        with ctx.timer("per_layer"):
            return [{"step": state.step, "epoch": ctx.epoch_of(state.step), **r}
                    for r in per_layer.measure(ctx.model, batch, ctx.loss_fn)]

    return (Hook("per_layer", ctx.per_eval, "point", measure, timed=False, what="a per-layer curvature measurement"),)


PER_LAYER = Measurement(
    name="per_layer", schedule="at initialisation, every --eval-every passes and at the end (with --per-layer)",
    options=(Option("per_layer", bool, False,
                    "at every evaluation, on the sharpness sample: lambda_max and trace of each conv/linear/BN "
                    "module's block of the Hessian and the GGN, and the Hessian's most negative eigenvalue "
                    "(experiments.features.per_layer.compute; about 10x a sharpness measurement)"),),
    records=(Record("per_layer", numbers=("lambda_max", "trace", "trace_stderr", "lambda_min", "n_params", "samples",
                                          "n_hvp", "trace_probes"),
                    strings=("module", "layer", "matrix"), integers=("epoch",)),),
    hooks=_hooks)
