"""`SmoothnessCallback`: the Tracker (experiments/tracker.py) in a PyTorch Lightning ``Trainer``. Optional: needs
the ``lightning`` extra (``pip install -e '.[lightning]'``).

    trainer = Trainer(max_epochs=cfg.epochs, callbacks=[SmoothnessCallback("results/my-study", cfg,
                      train_data=(x, y), test_data=(x_test, y_test))])

One optimizer, automatic optimisation, ``(inputs, targets)`` batches and a ``training_step`` that returns the loss;
resuming from a Lightning checkpoint is refused. Details: docs/explanation/modules.md#lightning-callback
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import lightning.pytorch as pl
import torch.nn.functional as F

from experiments.config import ConfigError, RunConfig
from experiments.tracker import Tracker

__all__ = ["SmoothnessCallback"]


class SmoothnessCallback(pl.Callback):
    """Records the built-in loop's measurements of a Lightning training run into ``root/<run id>``, the run named
    after the LightningModule's class (``config.model`` is replaced by its import string)."""

    def __init__(self, root, config: RunConfig, *, train_data, test_data, loss_fn: Callable = F.cross_entropy,
                 model_label: Optional[str] = None, dataset_label: Optional[str] = None,
                 model_args: Optional[dict] = None):
        super().__init__()
        self.root, self.config, self.loss_fn = Path(root), config, loss_fn
        self.train_data, self.test_data = train_data, test_data
        # the run is named after the LightningModule's class (experiments.tracker.own_model_config), model_args the
        # keyword arguments that build it again (smoothness-lab surface rebuilds it from its import string)
        self.labels = {"model_label": model_label, "dataset_label": dataset_label, "model_args": model_args}
        self.tracker: Optional[Tracker] = None

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigError(f"SmoothnessCallback tracks one optimizer; the module configures "
                              f"{len(trainer.optimizers)}")
        if trainer.global_step != 0:
            raise ConfigError("SmoothnessCallback cannot resume a Lightning run from a checkpoint yet: the tracker's "
                              "records would restart at step 0; train from the start")
        if not pl_module.automatic_optimization or trainer.accumulate_grad_batches != 1:
            raise ConfigError("SmoothnessCallback counts one optimizer step per batch: use automatic optimisation "
                              "and accumulate_grad_batches=1")
        self.tracker = Tracker(self.root, pl_module, self.loss_fn, trainer.optimizers[0], train_data=self.train_data,
                               test_data=self.test_data, config=self.config, **self.labels)
        self.tracker.resume()  # no tracker checkpoint under Lightning: a fresh start, any partial records dropped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tracker.begin_step(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.tracker.gradient_ready()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            raise ConfigError("SmoothnessCallback needs training_step to return the loss (or a dict with 'loss')")
        self.tracker.end_step(loss)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.tracker.end_epoch()

    def on_train_end(self, trainer, pl_module) -> None:
        self.tracker.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.tracker is not None:
            self.tracker.close_files()
