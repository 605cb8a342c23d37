"""Evaluation: train and test loss and accuracy in eval mode (running BatchNorm statistics), at initialisation, every
``--eval-every`` passes and at the end. Its points are where every per-pass measurement runs and a checkpoint is
written; a non-finite training loss there ends the run as diverged."""
from __future__ import annotations

import math

from experiments.features.base import Measurement, Metric, Option, Record, RunContext, positive_int


def _hooks(ctx: RunContext):
    from experiments.features.evaluation import compute
    from experiments.loop import Diverged, Hook

    def evaluate(state):
        with ctx.timer("eval"):
            rec = ctx.at(state.step, compute.eval_record(ctx.model, ctx.data, ctx.loss_fn))
        ctx.last_eval = rec
        ctx.emit(rec)
        if not math.isfinite(rec["train_loss"]):
            raise Diverged(state.step, "non-finite training loss in evaluation")

    return (Hook("eval", ctx.per_eval, "point", evaluate, timed=False, what="an evaluation"),)


EVALUATION = Measurement(
    name="evaluation", schedule="at initialisation, every --eval-every passes and at the end, eval mode",
    options=(Option("eval_every", int, 1, "passes between evaluations, per-pass measurements and checkpoints",
                    check=positive_int),),
    records=(Record("eval", numbers=("train_loss", "train_accuracy", "test_loss", "test_accuracy"),
                    bn_mode="running"),),
    hooks=_hooks,
    metrics=(Metric("final_train_loss", "final train loss ({loss}, whole training subset)", "eval", "train_loss",
                    "last"),
             Metric("final_test_accuracy", "final test accuracy", "eval", "test_accuracy", "last"),
             Metric("final_test_loss", "final test loss ({loss}, test set)", "eval", "test_loss", "last")))
