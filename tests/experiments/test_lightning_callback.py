"""experiments.lightning_callback.SmoothnessCallback in a tiny Lightning run (CPU, two passes of a few steps)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from experiments.cli import main
from experiments.config import RunConfig
from experiments.data import load_dataset
from experiments.models import build_model
from experiments.store import read_records

pytestmark = pytest.mark.needs_lightning

CFG = RunConfig(model="mlp", dataset="synthetic", subset=0.1, epochs=2, batch_size=40, lr=0.05, probe_every=2,
                probe_direction="update", sharpness_every=3, local_smoothness_samples=50, sharpness_samples=50,
                study="lightning", device="cpu")


def _module(cfg):
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model(cfg.model, input_shape=(1, 28, 28), num_classes=10)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=cfg.lr)

    return Classifier()


def test_a_lightning_run_writes_the_records_and_the_report_reads_them(tmp_path):
    import lightning.pytorch as pl

    from experiments.lightning_callback import SmoothnessCallback
    data = load_dataset(CFG.dataset, subset=CFG.subset, seed=CFG.seed)
    train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    loader = torch.utils.data.DataLoader(train, batch_size=CFG.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(CFG.seed)
    callback = SmoothnessCallback(tmp_path, CFG, train_data=(data.x_train, data.y_train),
                                  test_data=(data.x_test, data.y_test), model_label="Classifier")
    trainer = pl.Trainer(max_epochs=CFG.epochs, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[callback])
    trainer.fit(_module(CFG), loader)
    run = callback.tracker.store.dir
    assert run.parent == tmp_path and run.name.split("-lr")[0].endswith(".Classifier")  # the module's class names it
    records = read_records(run / "records.jsonl")
    per_epoch = len(loader)
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(2 * per_epoch))
    assert [(r["step"], r["epoch"]) for r in records if r["kind"] == "eval"] == \
        [(0, 0), (per_epoch, 1), (2 * per_epoch, 2)]
    assert [r["step"] for r in records if r["kind"] == "probe"] == list(range(0, 2 * per_epoch, 2))
    assert all(r["direction"] == "update" for r in records if r["kind"] == "probe")
    assert [r["step"] for r in records if r["kind"] == "sharpness"] == list(range(0, 2 * per_epoch, 3))
    assert (run / "done").exists()
    result = CliRunner().invoke(main, ["-q", "report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").exists()


def test_a_module_with_gradient_accumulation_is_refused(tmp_path):
    import lightning.pytorch as pl

    from experiments.config import ConfigError
    from experiments.lightning_callback import SmoothnessCallback
    x, y = torch.randn(8, 1, 28, 28), torch.randint(10, (8,))
    cfg = dataclasses.replace(CFG, batch_size=4)
    callback = SmoothnessCallback(tmp_path, cfg, train_data=(x, y), test_data=(x, y))
    trainer = pl.Trainer(max_epochs=1, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", accumulate_grad_batches=2,
                         callbacks=[callback])
    with pytest.raises(ConfigError, match="accumulate_grad_batches=1"):
        trainer.fit(_module(cfg), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4))
