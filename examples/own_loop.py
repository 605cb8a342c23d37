"""Your own training loop, tracked by smoothness-lab: a small CNN of your own on 6,000 FashionMNIST images, trained
by a plain PyTorch loop. Run it from any folder; it writes its run under ./results/own-loop and ends by printing the
commands that draw the run's figures and write its report. Interrupted? Run it again: it resumes from its last pass."""
import os

import torch
import torch.nn.functional as F
from torch import nn

from experiments import Tracker
from experiments.data import load_dataset
from experiments.tracker import run_config

QUICK = os.environ.get("SMOOTHNESS_QUICK") == "1"   # one pass instead of two (the docs' test sets it)
SEED, EPOCHS, BATCH = 0, 1 if QUICK else 2, 64
STUDY = "results/own-loop"
torch.manual_seed(SEED)

# Data: 10% of FashionMNIST's training set (6,000 images, drawn with SEED) and its test set, as tensors. The loader
# looks in ./data, then /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist), or where
# $SMOOTHNESS_DATA points, and downloads the files when they are nowhere.
data = load_dataset("fashion-mnist", subset=0.1, seed=SEED)
x, y = data.x_train, data.y_train

# Your model and your optimizer.
model = nn.Sequential(
    nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

# What the run is (its config.json) and what to measure. The network is taken as it is: the run is named after its
# class; tracker.json keeps model_label, the class and the normalisation found in its layers.
config = run_config(optimizer, study="own-loop", dataset="fashion-mnist", subset=0.1, seed=SEED,
                    batch_size=BATCH, epochs=EPOCHS, sampling="shuffle",
                    probe_every=20, probe_direction="update")   # line probe along the step SGD takes, every 20 steps
tracker = Tracker(STUDY, model, F.cross_entropy, optimizer, train_data=(x, y), test_data=(data.x_test, data.y_test),
                  config=config, model_label="SmallCNN")

# The loop: yours, with the tracker around the optimizer step.
order = torch.Generator().manual_seed(SEED)          # the data order: part of what a resume restores
saved = tracker.resume()                             # None on a fresh start, else what the last checkpoint saved
if saved:
    order.set_state(saved["order"])
for epoch in range(tracker.epoch, EPOCHS):
    for idx in torch.randperm(len(x), generator=order).split(BATCH):
        xb, yb = x[idx], y[idx]
        with tracker.step((xb, yb)) as s:
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()                         # the tracker measures just before the update
            s.record(loss, out)
    tracker.end_epoch()                              # evaluation, local smoothness, sharpness (λ_max)
    tracker.checkpoint({"order": order.get_state()})
tracker.close()

print(f"run: {tracker.run_dir}")
print(f"smoothness-lab plot {STUDY}")
print(f"smoothness-lab report {STUDY}")
