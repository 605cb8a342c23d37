"""Your model, your data (issue 22): MODULE:FACTORY import strings, their run ids, one-line errors, the factories'
sha256 and status's "code changed" line, image folders, and the example package through train and sweep."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from experiments import imagefolder, plugins
from experiments.cli import main
from experiments.config import ConfigError, RunConfig, StudyConfig
from experiments.data import DATASETS, DataError
from experiments.status import run_info

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODULE = "userfactories"   # written into tmp_path by the fixture below

FACTORIES = '''
import torch
from torch import nn

class Blobs(torch.utils.data.Dataset):
    """n (1, 4, 4) inputs in 3 classes, labels as ints (torchvision's convention)."""
    classes = ["a", "b", "c"]
    def __init__(self, n, seed, label=int, shape=(1, 4, 4)):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, *shape, generator=g) + self.y.view(-1, 1, 1, 1)
        self.label = label
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i], self.label(self.y[i])

def data(n_train=200, n_test=60):
    return Blobs(n_train, 0), Blobs(n_test, 1)

def data_dict():
    return {"train": Blobs(60, 0), "test": Blobs(30, 1)}

def net(input_shape, num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width), nn.ReLU(),
                         nn.Linear(width, num_classes))

def net_no_shape(width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))

def raises(**_):
    raise ValueError("width must be even")

def not_a_module(**_):
    return "a string"

def five_outputs(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5))

def data_three():
    return Blobs(10, 0), Blobs(10, 1), Blobs(10, 2)

def data_not_pairs():
    class Single(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return {"x": torch.zeros(2), "y": 0}
    return Single(), Single()

def data_ragged():
    class Ragged(Blobs):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return (x if i < 3 else x[:, :2]), y
    return Ragged(10, 0), Blobs(10, 1)

def data_float_labels():
    return Blobs(10, 0, label=float), Blobs(10, 1, label=float)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(user_module_from):
    """A user package on sys.path (as PYTHONPATH puts it there), fresh for every test."""
    return user_module_from(MODULE, FACTORIES)


TINY = ["--epochs", "1", "--batch-size", "20", "--probe-every", "5", "--probe-steps", "2", "--sharpness-samples", "32",
        "--local-smoothness-samples", "64", "--sharpness-tol", "0.01", "--subset", "1", "--device", "cpu"]


def _train(tmp_path, *args):
    return CliRunner().invoke(main, ["-q", "train", "--results-dir", str(tmp_path / "results"), *TINY, *args])


# -- identity -------------------------------------------------------------------------------------------------
def test_import_string_and_its_arguments_are_part_of_the_run_id():
    base = RunConfig(model=f"{MODULE}:net", dataset=f"{MODULE}:data")
    assert base.run_id.startswith(f"{MODULE}.net-lr0.04-s0-") and ":" not in base.run_id and base.norm is None
    wider = RunConfig(model=f"{MODULE}:net", dataset=f"{MODULE}:data", model_args={"width": 16})
    other_data = RunConfig(model=f"{MODULE}:net", dataset=f"{MODULE}:data", dataset_args={"n_train": 100})
    other_factory = RunConfig(model=f"{MODULE}:net_no_shape", dataset=f"{MODULE}:data")
    assert len({c.run_id for c in (base, wider, other_data, other_factory)}) == 4
    assert "model_args" not in base.hashed_dict() and wider.hashed_dict()["model_args"] == {"width": 16}
    # arguments are canonical: their order and 16 vs 16.0 do not matter; the config round-trips through JSON
    a = RunConfig(model=f"{MODULE}:net", model_args={"width": 16, "depth": 2})
    b = RunConfig(model=f"{MODULE}:net", model_args={"depth": 2, "width": 16})
    assert a.run_id == b.run_id and list(a.model_args) == ["depth", "width"]
    assert RunConfig.from_dict(json.loads(json.dumps(a.to_dict()))).run_id == a.run_id
    assert hash(a) == hash(b)
    # a built-in config without the new fields keeps its id (test_committed_runs checks every committed one)
    assert RunConfig().hashed_dict() == {k: v for k, v in RunConfig().hashed_dict().items()
                                         if k not in ("model_args", "dataset_args")}


def test_models_list_mixes_builtins_norm_variants_and_import_strings():
    study = StudyConfig(models=("convnet", "convnet:noisy", f"{MODULE}:net", "pkg.sub:make"), seeds=(0,))
    assert [(c.model, c.norm) for c in study.runs()] == [
        ("convnet", "none"), ("convnet", "noisy"), (f"{MODULE}:net", None), ("pkg.sub:make", None)]


def test_parse_args_reads_json_where_it_parses():
    assert plugins.parse_args(["width=16", "norm=bn", "lr=0.5", "flag=true", "size=[32, 32]", "name=\"x\""],
                              "--model-arg") == {"flag": True, "lr": 0.5, "name": "x", "norm": "bn",
                                                 "size": [32, 32], "width": 16}
    for bad in ("width", "=3", "2x=1"):
        with pytest.raises(plugins.PluginError, match="KEY=VALUE"):
            plugins.parse_args([bad], "--model-arg")


@pytest.mark.parametrize("kwargs, needle", [
    (dict(model="convnet", model_args={"width": 8}), "--model-arg applies to a model given as MODULE:FACTORY"),
    (dict(dataset="synthetic", dataset_args={"n": 8}), "--dataset-arg applies"),
    (dict(model=f"{MODULE}:net", norm="torch"), "--norm applies to the built-in models"),
    (dict(model=f"{MODULE}:net-2"), "not an import string MODULE:FACTORY"),
    (dict(model=f"{MODULE}:net", model_args={"w": float("nan")}), "KEY=VALUE pairs with JSON values"),
])
def test_config_refuses_misplaced_factory_options(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**kwargs)


# -- one-line errors, nothing written ---------------------------------------------------------------------------
M, D = f"{MODULE}:net", f"{MODULE}:data"
MISTAKES = {
    "module not importable": (["--model", "no_such_module_xyz:net", "--dataset", D],
                              "no module named 'no_such_module_xyz' is importable; put the folder that holds "
                              "no_such_module_xyz on PYTHONPATH"),
    "dataset module not importable": (["--model", M, "--dataset", "no_such_data_xyz:load"],
                                      "no module named 'no_such_data_xyz' is importable"),
    "no such attribute": (["--model", f"{MODULE}:nett", "--dataset", D], "has no attribute 'nett'; it defines:"),
    "not callable": (["--model", f"{MODULE}:NOT_CALLABLE", "--dataset", D], "is a int, not a callable factory"),
    "factory raised": (["--model", f"{MODULE}:raises", "--dataset", D, "--model-arg", "width=3"],
                       f"--model {MODULE}:raises raised ValueError: width must be even (called as raises(width=3"),
    "model factory returns no module": (["--model", f"{MODULE}:not_a_module", "--dataset", D],
                                        "returned a str; expected a torch.nn.Module"),
    "dataset factory returns no pair": (["--model", M, "--dataset", f"{MODULE}:data_three"],
                                        "returned a tuple; expected (train, test) torch Datasets"),
    "items not pairs": (["--model", M, "--dataset", f"{MODULE}:data_not_pairs"],
                        "the training set, item 0 is a dict, expected a pair (tensor, int label)"),
    "items of several shapes": (["--model", M, "--dataset", f"{MODULE}:data_ragged"],
                                "item 3: the input has shape (1, 2, 4), item 0 (1, 4, 4)"),
    "labels not ints": (["--model", M, "--dataset", f"{MODULE}:data_float_labels"],
                        "the label is a float (0.0), expected an int class index"),
    "outputs do not match the classes": (["--model", f"{MODULE}:five_outputs", "--dataset", D],
                                         "returns shape (2, 5) for 2 inputs", ),
    "unknown factory argument": (["--model", M, "--dataset", D, "--model-arg", "depth=3"],
                                 "got an unexpected keyword argument 'depth'"),
    "bad KEY=VALUE": (["--model", M, "--dataset", D, "--model-arg", "width"], "is not KEY=VALUE"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_every_mistake_is_one_line_before_anything_is_written(mistake, user_module, tmp_path):
    args, needle = MISTAKES[mistake]
    result = _train(tmp_path, *args)
    assert result.exit_code != 0
    message = result.output.strip()
    assert needle in message and "Traceback" not in message, message
    assert len(message.splitlines()) == 1, message
    assert not (tmp_path / "results").exists()


def test_the_outputs_message_names_the_classes(user_module, tmp_path):
    message = _train(tmp_path, "--model", f"{MODULE}:five_outputs", "--dataset", D).output
    assert "expected a tensor of shape (2, 3): one output per class (3 classes)" in message


# -- training a user's model on a user's data -------------------------------------------------------------------
def test_train_records_sha256_and_status_says_code_changed(user_module, tmp_path):
    result = _train(tmp_path, "--model", M, "--model-arg", "width=4", "--dataset", D)
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "results" / "train").iterdir()
    assert run.name.startswith(f"{MODULE}.net-lr0.04-s0-")
    config = json.loads((run / "config.json").read_text())
    assert (config["model"], config["model_args"], config["dataset"], config["dataset_args"], config["norm"]) == (
        M, {"width": 4}, D, {}, None)
    sha = hashlib.sha256(user_module.read_bytes()).hexdigest()
    code = json.loads((run / "code.json").read_text())
    assert code["model"] == {"import": M, "file": str(user_module.resolve()), "sha256": sha,
                             "normalization": "none"}   # read from the network's layers: the BN axis
    assert code["dataset"]["sha256"] == sha
    info = json.loads((run / "dataset.json").read_text())
    assert (info["source"], info["n_train"], info["n_test"], info["standardisation"]) == ("import", 200, 60, "none")
    state, detail = run_info(run)
    assert state == "done" and "code changed" not in detail
    user_module.write_text(user_module.read_text() + "\n# an edit\n")
    state, detail = run_info(run)
    assert state == "done" and detail.endswith(f"; code changed since this run ({MODULE}.py)")
    status = CliRunner().invoke(main, ["status", str(tmp_path / "results" / "train")])
    assert "code changed since this run" in status.output
    again = _train(tmp_path, "--model", M, "--model-arg", "width=4", "--dataset", D)  # not silently reused
    assert again.exit_code == 0 and "warning: code changed since this run: userfactories.py differs" in again.output
    user_module.rename(user_module.with_suffix(".moved"))   # results read on a machine without the user's code
    assert run_info(run)[1].endswith(f"; its code {MODULE}.py is not on PYTHONPATH: unchecked")


def test_dict_return_and_factory_without_shape_arguments(user_module, tmp_path):
    cfg = RunConfig(model=f"{MODULE}:net_no_shape", dataset=f"{MODULE}:data_dict", subset=1.0)
    plugins.check_run(cfg)
    data = plugins.load_run_dataset(cfg)
    assert (data.input_shape, data.num_classes, len(data.x_train), len(data.x_test)) == ((1, 4, 4), 3, 60, 30)
    assert data.y_train.dtype == torch.int64 and data.x_train.dtype == torch.float32


def test_a_200_image_dataset_trains_with_the_default_sample_sizes(user_module, tmp_path):
    """--sharpness-samples 256, --local-smoothness-samples 2000 and --generalization-samples 1000 (the defaults)
    cap themselves at the 200 images; the batch size larger than the subset is refused, with the fix."""
    result = CliRunner().invoke(main, ["-q", "train", "--results-dir", str(tmp_path / "results"), "--model", M,
                                       "--dataset", D, "--subset", "1", "--epochs", "1", "--probe-every", "0",
                                       "--generalization-every", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "results" / "train").iterdir()
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert [r["n_samples"] for r in records if r["kind"] == "generalization"][-1] == 200
    refused = CliRunner().invoke(main, ["-q", "train", "--results-dir", str(tmp_path / "other"), "--model", M,
                                        "--dataset", D, "--epochs", "1"])   # --subset 0.1: 20 images, batch 32
    assert refused.exit_code != 0 and "--batch-size 32 is larger than the training subset (20 images" in \
        refused.output and not (tmp_path / "other").exists()


# -- image folders ----------------------------------------------------------------------------------------------
try:
    RAW = DATASETS["fashion-mnist"].load(None, False)   # the uint8 images, as the PNG files hold them
except DataError:
    RAW = None
needs_fashion = pytest.mark.skipif(RAW is None, reason="real FashionMNIST not found offline (dataset-fashion-mnist)")


def _write_tree(root: Path, n_train: int = 200, n_test: int = 60, rgb_every: int = 0) -> None:
    """Real FashionMNIST images as PNG files in root/{train,test}/<class>/<i>.png."""
    from PIL import Image
    for split, x, y, n in (("train", RAW.x_train, RAW.y_train, n_train), ("test", RAW.x_test, RAW.y_test, n_test)):
        for i in range(n):
            folder = root / split / f"class{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(x[i, 0].numpy(), mode="L")
            (image.convert("RGB") if rgb_every and i % rgb_every == 0 else image).save(folder / f"{i:04d}.png")


@needs_fashion
def test_imagefolder_reads_real_images_exactly(tmp_path):
    _write_tree(tmp_path / "tree", n_train=40, n_test=20)
    x_train, y_train, x_test, y_test, classes, info, standardise = imagefolder.load_imagefolder(
        str(tmp_path / "tree"), {})
    assert x_train.shape == (40, 1, 28, 28) and info["mode"] == "L" and standardise
    # ImageFolder orders samples by class folder, then file name: compare as sets of (image, label)
    names = info["classes"]
    got = {(bytes((x * 255).round().to(torch.uint8).numpy()), names[y]) for x, y in zip(x_train, y_train.tolist())}
    want = {(bytes(RAW.x_train[i].numpy()), f"class{int(RAW.y_train[i])}") for i in range(40)}
    assert got == want and classes == len(names)
    resized = imagefolder.load_imagefolder(str(tmp_path / "tree"), {"size": 14, "standardise": False})
    assert resized[0].shape == (40, 1, 14, 14) and not resized[6]


@needs_fashion
def test_imagefolder_mixed_grey_and_rgb_becomes_rgb(tmp_path):
    _write_tree(tmp_path / "tree", n_train=60, n_test=6, rgb_every=5)
    x_train, *_, info, _ = imagefolder.load_imagefolder(str(tmp_path / "tree"), {})
    assert x_train.shape == (60, 3, 28, 28) and info["mode"] == "RGB"


@pytest.mark.parametrize("layout, args, needle", [
    ("missing", {}, "is not a folder"),
    ("no-test", {}, "has no test/ folder"),
    ("ok", {"colour": 1}, "an imagefolder dataset takes only size, standardise"),
    ("ok", {"size": -2}, "size must be a positive integer"),
])
def test_imagefolder_mistakes_are_one_line(tmp_path, layout, args, needle):
    from PIL import Image
    root = tmp_path / "tree"
    if layout != "missing":
        for split in ("train",) + (("test",) if layout == "ok" else ()):
            (root / split / "a").mkdir(parents=True)
            Image.new("L", (4, 4)).save(root / split / "a" / "0.png")
    result = _train(tmp_path, "--model", "mlp", "--dataset", f"imagefolder:{root}",
                    *[f"--dataset-arg={k}={json.dumps(v)}" for k, v in args.items()])
    assert result.exit_code != 0 and needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


@needs_fashion
def test_train_on_an_imagefolder_of_real_fashion_mnist_pngs(tmp_path):
    _write_tree(tmp_path / "tree")
    result = _train(tmp_path, "--model", "mlp", "--dataset", f"imagefolder:{tmp_path / 'tree'}")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "results" / "train").iterdir()
    info = json.loads((run / "dataset.json").read_text())
    assert (info["source"], info["n_train"], info["n_test"], info["mode"]) == ("imagefolder", 200, 60, "L")
    assert info["standardisation"].startswith("per-channel")
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == f"imagefolder:{(tmp_path / 'tree').resolve()}"
    evals = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["test_accuracy"] > 0.2   # 10 classes (chance 0.1): an MLP learns from 200 images in 10 steps


# -- the example package, through sweep --executor process --------------------------------------------------------
@needs_fashion
@pytest.mark.slow
def test_example_package_sweeps_through_processes_and_gets_its_report(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    result = CliRunner().invoke(main, [
        "-q", "sweep", "--name", "own", "--results-dir", str(tmp_path), "--models",
        "small_resnet:resnet_bn,small_resnet:resnet_plain", "--model-arg", "width=4", "--dataset",
        "fashion_subset:fashion", "--dataset-arg", "n_train=200", "--dataset-arg", "n_test=100", "--lrs", "0.05",
        "--seeds", "0", "--executor", "process", "--workers", "2", *TINY[:-4]])
    assert result.exit_code == 0, result.output
    study = tmp_path / "own"
    runs = sorted(p.name.split("-lr")[0] for p in study.iterdir() if (p / "done").exists())
    assert runs == ["small_resnet.resnet_bn", "small_resnet.resnet_plain"]
    report = (study / "report.md").read_text()
    assert "small_resnet:resnet_bn" in report and "small_resnet:resnet_plain" in report
    assert any((study / "figures").glob("*.png"))


def test_sweep_mixes_builtin_and_user_models_and_takes_args_from_a_sweep_file(user_module, tmp_path):
    """--model-arg goes to the MODULE:FACTORY entries of --models only; a sweep file may hold model_args."""
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({"models": ["mlp", M], "model_args": {"width": 4}, "dataset": D}))
    result = CliRunner().invoke(main, ["-q", "sweep", "--name", "mixed", "--results-dir", str(tmp_path / "results"),
                                       "--sweep-file", str(sweep_file), "--seeds", "0", "--executor", "serial",
                                       "--no-figures", *TINY])
    assert result.exit_code == 0, result.output
    configs = {json.loads(p.read_text())["model"]: json.loads(p.read_text())
               for p in (tmp_path / "results" / "mixed").glob("*/config.json")}
    assert configs["mlp"]["model_args"] == {} and configs[M]["model_args"] == {"width": 4}
    assert configs["mlp"]["dataset"] == configs[M]["dataset"] == D
