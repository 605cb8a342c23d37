"""Diagnostics outside the training runs: `smoothness-lab variance` and `smoothness-lab ics`.

- **Activation variance through the residual MLP** (seed 002, METHODS.md §8): at initialisation (He init, bias 0),
  in train mode (BatchNorm uses batch statistics), feed one batch of training data and take, at each point, the
  variance of every neuron over the batch (biased, as ``np.var``) averaged over the neurons. Points: the input, the
  first preactivation (the stem's output, where the residual stream starts) and the stream after each residual
  connection.
- **Internal covariate shift along SGD** (Santurkar et al. 2018, Fig. 3/5; METHODS.md §5): train with plain SGD and,
  every N steps, on that step's batch and before the step is taken, compare each layer's gradient G with G′, its
  gradient after the earlier layers took their SGD update (``smoothness.internal_covariate_shift``, BatchNorm in
  ``batch`` mode). ICS is absent when ‖G − G′‖ = 0 and cos(G, G′) = 1.

Both commands print/write a CSV (long form, one row per measurement) and a seaborn figure (PNG and PDF), each
written atomically (a temporary file, then a rename).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence

import click

from experiments.plotstyle import styled

if TYPE_CHECKING:  # torch, pandas and the data stack are imported when used: `smoothness-lab --help` stays fast
    import pandas as pd
    import torch
    from torch import nn

__all__ = ["residual_variance", "residual_locations", "variance_table", "variance_figure", "variance_command",
           "parse_model_spec", "ics_trace", "ics_figure", "ics_command"]

VARIANCE_MODELS = ("resmlp", "bn-resmlp")


# ---------------------------------------------------------------------------------------------------------------
# Activation variance through residual blocks (seed 002)

def residual_locations(n_blocks: int) -> List[str]:
    """Labels of the points `residual_variance` measures: input, first preactivation, residual 1 … n."""
    return ["input", "first preactivation"] + [f"residual {i}" for i in range(1, n_blocks + 1)]


def _neuron_variance(h: torch.Tensor) -> float:
    """Variance of each neuron over the batch (biased, as the seed's np.var), averaged over neurons."""
    return float(h.flatten(1).double().var(dim=0, correction=0).mean())


def residual_variance(model: nn.Module, x: torch.Tensor, *, train: bool = True) -> List[float]:
    """Mean per-neuron variance over the batch ``x`` of the input, the first preactivation and the residual stream
    after each residual connection (``model.residual_outputs``), in train mode (BatchNorm batch statistics) unless
    ``train`` is False. The model is left as it was: its mode and its buffers (BN running statistics) are restored.
    Labels of the returned values: ``residual_locations(len(values) - 2)``."""
    import torch

    if not hasattr(model, "residual_outputs"):
        raise ValueError(f"{type(model).__name__} has no residual_outputs(); residual_variance needs a residual "
                         f"MLP such as the registry's {' or '.join(VARIANCE_MODELS)}")
    if x.shape[0] < 2:
        raise ValueError(f"a variance over the batch needs at least 2 examples, got a batch of {x.shape[0]}")
    was_training = model.training
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    device = next(model.parameters()).device
    try:
        model.train(train)
        with torch.no_grad():
            outputs = model.residual_outputs(x.to(device))
        return [_neuron_variance(x)] + [_neuron_variance(h) for h in outputs]
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


def variance_table(dataset: str = "mnist1d", seed: int = 0, batch_size: int = 200, data_dir: Optional[str] = None,
                   models: Sequence[str] = VARIANCE_MODELS) -> pd.DataFrame:
    """`residual_variance` of each model at initialisation on one batch of ``dataset``'s training split.

    The batch: ``batch_size`` distinct training examples drawn by ``torch.randperm`` under a generator seeded with
    ``seed`` (whole training split, standardised as every dataset is). Each model is built after
    ``torch.manual_seed(seed)``, so both models start from the same linear weights (He uniform, bias 0).
    Columns: model, position (0 = input), location, variance, ratio (variance / the input's).
    """
    import pandas as pd
    import torch

    from experiments.data import load_dataset
    from experiments.models import build_model

    data = load_dataset(dataset, subset=1.0, seed=seed, data_dir=data_dir)
    n = data.x_train.shape[0]
    if not 2 <= batch_size <= n:
        raise ValueError(f"--batch-size must be between 2 and the {n} training examples of {dataset}, "
                         f"got {batch_size}")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]
    x = data.x_train[idx]
    rows = []
    for name in models:
        torch.manual_seed(seed)
        model = build_model(name, input_shape=data.input_shape, num_classes=data.num_classes)
        values = residual_variance(model, x)
        for position, (location, value) in enumerate(zip(residual_locations(len(values) - 2), values)):
            rows.append({"model": name, "position": position, "location": location, "variance": value,
                         "ratio": value / values[0]})
    return pd.DataFrame(rows, columns=["model", "position", "location", "variance", "ratio"])


def _styled_figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


@styled
def variance_figure(table: pd.DataFrame):
    """Variance (log scale) against the position in the network, one line per model."""
    import seaborn as sns

    fig, axes = _styled_figure(1, 1, 6.5, 4.2)
    ax = axes[0, 0]
    sns.lineplot(data=table, x="position", y="variance", hue="model", marker="o", ax=ax)
    labels = table.drop_duplicates("position").sort_values("position")
    ax.set_xticks(labels["position"].tolist(), labels["location"].tolist(), rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("position in the residual MLP (residual connection index)")
    ax.set_ylabel("mean per-neuron variance over the batch")
    ax.set_title("Activation variance at initialisation (train mode)")
    return fig


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    from experiments.store import atomic_write_bytes
    atomic_write_bytes(path, table.to_csv(index=False).encode())


def _quiet(ctx: click.Context) -> bool:
    root = ctx.find_root().obj
    return bool(root.get("quiet")) if isinstance(root, dict) else False


@click.command("variance")
@click.option("--dataset", default="mnist1d", show_default=True, help="dataset whose training batch is fed")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="seeds the batch and the initial weights")
@click.option("--batch-size", default=200, show_default=True, type=click.IntRange(min=2),
              help="examples in the batch (seed 002 uses 200)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/resmlp-variance"),
              show_default=True, help="folder for variance.csv and variance.png/.pdf")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="folder holding the dataset files")
@click.pass_context
def variance_command(ctx, dataset, seed, batch_size, out, data_dir):
    """Seed 002: activation variance through the residual MLP at initialisation, without and with BatchNorm."""
    from experiments.analysis import save_figure
    from experiments.data import DataError
    try:
        table = variance_table(dataset, seed, batch_size, None if data_dir is None else str(data_dir))
    except (ValueError, DataError) as exc:
        raise click.ClickException(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(table, out / "variance.csv")
    paths = save_figure(variance_figure(table), out, "variance")
    if not _quiet(ctx):
        wide = table.pivot(index=["position", "location"], columns="model", values="variance")
        wide = wide.droplevel("position")[list(dict.fromkeys(table["model"]))]
        click.echo(f"mean per-neuron variance over a batch of {batch_size} ({dataset}, seed {seed}), "
                   "at initialisation, train mode:")
        click.echo(wide.to_string(float_format=lambda v: f"{v:.3f}"))
        click.echo(f"wrote {out / 'variance.csv'}, " + ", ".join(str(p) for p in paths))


# ---------------------------------------------------------------------------------------------------------------
# Internal covariate shift along SGD (Santurkar Fig. 3/5)

def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"model"`` or ``"model:norm"`` -> (model, norm), norm resolved to the model's default; ValueError listing
    the choices for an unknown model or norm."""
    from experiments.models import MODELS, resolve_norm
    from experiments.normalization import NORMS

    model, _, norm = spec.strip().partition(":")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)} (optionally as model:norm)")
    norm = resolve_norm(model, norm or None)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r} in {spec!r}; choose one of: {', '.join(NORMS)}")
    return model, norm


def _weight_layer_index(model: nn.Module, layers: Sequence[str]) -> dict:
    """1-based index of each conv/linear layer among the ICS layers (norm layers get none): lets models with and
    without normalisation layers be compared layer by layer."""
    from torch import nn

    modules = dict(model.named_modules())
    index, out = 0, {}
    for layer in layers:
        if isinstance(modules.get(layer), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            index += 1
            out[layer] = index
    return out


def ics_trace(model: str = "convnet", *, norm: Optional[str] = None, dataset: str = "fashion-mnist",
              subset: float = 0.1, lr: float = 0.04, steps: int = 200, every: int = 20, batch_size: int = 32,
              seed: int = 0, device: str = "auto", data_dir: Optional[str] = None, label: Optional[str] = None,
              data=None) -> pd.DataFrame:
    """Train ``model`` (with ``norm``) by plain SGD for ``steps`` steps and measure Santurkar's internal covariate
    shift on the step's batch, before the step, at steps 0, every, 2·every, …

    Seeding as in `experiments.training.train_run`: the training subset by ``seed``, ``torch.manual_seed(seed)``
    before building the model, minibatches of ``batch_size`` drawn with replacement by a generator seeded with
    ``seed``. ``data`` may pass an already loaded `experiments.data.Dataset` (then dataset/subset/data_dir are not
    used). Returns one row per (measurement step, layer): model (``label``, default ``model`` or ``model:norm``),
    step, layer, layer_type, weight_layer (1-based index among conv/linear layers; NA for norm layers),
    grad_diff_norm, cosine, lr, bn_mode. If the loss stops being finite the trace ends there and
    ``frame.attrs["diverged_at"]`` holds the step (else None).
    """
    import pandas as pd
    import torch
    import torch.nn.functional as F

    import smoothness

    from experiments.data import load_dataset
    from experiments.loop import Diverged, Hook, Timer, run_steps
    from experiments.models import MODELS, build_model
    from experiments.training import resolve_device

    model_name, norm = parse_model_spec(model if norm is None else f"{model}:{norm}")
    label = label or (model_name if norm == MODELS[model_name].default_norm else f"{model_name}:{norm}")
    for name, value in (("steps", steps), ("every", every), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"--lr must be a finite number >= 0, got {lr!r}")
    dev = resolve_device(device)
    if data is None:
        data = load_dataset(dataset, subset=subset, seed=seed, data_dir=data_dir)
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    n = x_train.shape[0]

    torch.manual_seed(seed)
    net = build_model(model_name, norm=norm, input_shape=data.input_shape, num_classes=data.num_classes).to(dev)
    sampler = torch.Generator().manual_seed(seed)
    modules = dict(net.named_modules())
    weight_index: dict = {}

    def batch(step):
        idx = torch.randint(n, (batch_size,), generator=sampler).to(dev)
        return x_train[idx], y_train[idx]

    def measure(state):
        shift = smoothness.internal_covariate_shift(state.model, F.cross_entropy, state.batch, lr, bn_mode="batch")
        if not weight_index:
            weight_index.update(_weight_layer_index(net, [s.layer for s in shift.layers]))
        return [{"kind": "ics", "model": label, "step": state.step, "layer": s.layer,
                 "layer_type": type(modules.get(s.layer, net)).__name__, "weight_layer": weight_index.get(s.layer),
                 "grad_diff_norm": s.grad_diff_norm, "cosine": s.cosine, "lr": float(lr), "bn_mode": shift.bn_mode}
                for s in shift.layers]

    rows, diverged_at = [], None
    try:
        run_steps(net, torch.optim.SGD(net.parameters(), lr=lr), None, batch, start=0, total=steps,
                  hooks=[Hook("ics", every, "before", measure)],
                  emit=lambda r: rows.append(r) if r["kind"] == "ics" else None, epoch_of=lambda t: 0,
                  timer=Timer(dev))
    except Diverged as d:
        diverged_at = d.step
    columns = ["model", "step", "layer", "layer_type", "weight_layer", "grad_diff_norm", "cosine", "lr", "bn_mode"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["weight_layer"] = frame["weight_layer"].astype("Int64")
    frame.attrs["diverged_at"] = diverged_at
    return frame


@styled
def ics_figure(frame: pd.DataFrame):
    """‖G − G′‖ (top row) and cos(G, G′) (bottom row) against the SGD step, one column per conv/linear layer
    (numbered in forward order, so models with and without norm layers line up), one line per model."""
    import seaborn as sns

    weights = frame.dropna(subset=["weight_layer"])
    layers = sorted(int(i) for i in weights["weight_layer"].unique()) or [None]
    fig, axes = _styled_figure(2, len(layers), 3.8, 3.2)
    order = list(dict.fromkeys(frame["model"]))
    palette = dict(zip(order, sns.color_palette(n_colors=max(1, len(order)))))
    for col, layer in enumerate(layers):
        sub = weights[weights["weight_layer"] == layer] if layer is not None else weights
        for row, (metric, ylabel) in enumerate((("grad_diff_norm", "‖G − G′‖₂"), ("cosine", "cos(G, G′)"))):
            ax = axes[row, col]
            if not sub.empty:
                sns.lineplot(data=sub, x="step", y=metric, hue="model", hue_order=order, palette=palette,
                             marker="o", ax=ax, legend=(row == 0 and col == len(layers) - 1))
            names = ", ".join(sorted(set(sub["layer"]))) if not sub.empty else "no layers"
            ax.set_title(f"layer {layer} ({names})" if row == 0 else "", fontsize="small")
            ax.set_xlabel("SGD step" if row == 1 else "")
            ax.set_ylabel(ylabel if col == 0 else "")
    fig.suptitle("Internal covariate shift (Santurkar et al.): G vs G′ after the earlier layers' SGD update")
    return fig


@click.command("ics")
@click.option("--models", default="convnet,bn-convnet", show_default=True,
              help="comma-separated models, each optionally model:norm (e.g. convnet:noisy)")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="fashion-mnist, mnist1d, synthetic, mnist, mnist-32x3, svhn or cifar10")
@click.option("--subset", default=0.1, show_default=True, type=float,
              help="fraction of the training set used, drawn with the seed")
@click.option("--lr", default=0.04, show_default=True, type=click.FloatRange(min=0), help="SGD learning rate")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="minibatch size")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(min=1), help="SGD steps per model")
@click.option("--every", default=20, show_default=True, type=click.IntRange(min=1),
              help="measure ICS every N steps (from step 0)")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto: cuda if available")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/ics"),
              show_default=True, help="folder for ics.csv, ics.json and ics.png/.pdf")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="folder holding the dataset files")
@click.pass_context
def ics_command(ctx, models, dataset, subset, lr, batch_size, steps, every, seed, device, out, data_dir):
    """Santurkar's internal covariate shift along plain SGD, per layer, models compared."""
    import pandas as pd

    from experiments.analysis import save_figure
    from experiments.config import ConfigError
    from experiments.data import DATASETS, DataError, load_dataset
    from experiments.models import build_model
    from experiments.store import atomic_write_json
    quiet = _quiet(ctx)
    specs = [s.strip() for s in models.split(",")]
    try:
        if any(not s for s in specs):
            raise ValueError(f"empty item in --models {models!r}; write a comma-separated list")
        if len(set(specs)) != len(specs):
            raise ValueError(f"--models lists a model twice: {specs}")
        parsed = [parse_model_spec(s) for s in specs]
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r} (--dataset); choose one of: {', '.join(DATASETS)}")
        data = load_dataset(dataset, subset=subset, seed=seed, data_dir=None if data_dir is None else str(data_dir))
        for model_name, norm in parsed:  # fail on a shape mismatch before any training
            build_model(model_name, norm=norm, input_shape=data.input_shape, num_classes=data.num_classes)
        frames = []
        for spec, (model_name, norm) in zip(specs, parsed):
            frame = ics_trace(model_name, norm=norm, lr=lr, steps=steps, every=every, batch_size=batch_size,
                              seed=seed, device=device, label=spec, data=data)
            if frame.attrs["diverged_at"] is not None:
                click.echo(f"{spec}: non-finite loss at step {frame.attrs['diverged_at']}; its trace stops there",
                           err=True)
            elif not quiet:
                last = frame[frame["step"] == frame["step"].max()]
                click.echo(f"{spec}: step {int(last['step'].iloc[0])}: " + ", ".join(
                    f"{r.layer} ‖G−G′‖={r.grad_diff_norm:.3g} cos={r.cosine:.3f}" for r in last.itertuples()))
            frames.append(frame)
    except (ValueError, DataError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    table = pd.concat(frames, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(table, out / "ics.csv")
    atomic_write_json(out / "ics.json", {"models": specs, "dataset": dataset, "subset": subset, "lr": lr,
                                         "batch_size": batch_size, "steps": steps, "every": every, "seed": seed,
                                         "device": device, "bn_mode": "batch",
                                         "diverged_at": {s: f.attrs["diverged_at"] for s, f in zip(specs, frames)}})
    paths = save_figure(ics_figure(table), out, "ics")
    if not quiet:
        click.echo(f"wrote {out / 'ics.csv'}, " + ", ".join(str(p) for p in paths))
