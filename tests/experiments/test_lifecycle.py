"""The run lifecycle of the run store (start, begin, checkpoint, diverged, finish), shared by train_run and the
Tracker: a resume on changed code or data is refused and the provenance files are kept; the Tracker refuses epochs
its config does not have and does not finish a run closed early; a finished run whose records were cut is named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experiments import plugins
from experiments.config import RunConfig
from experiments.status import run_info
from experiments.store import RunState, StoreError, check_finished, is_done, read_records
from experiments.tracker import Tracker
from experiments.training import train_run

RESULTS = Path(__file__).resolve().parents[2] / "results"
MODULE = "lifecycle_factories"

FACTORIES = '''
import torch
from torch import nn

def net(input_shape, num_classes, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width), nn.ReLU(),
                         nn.Linear(width, num_classes))

class Saved(torch.utils.data.Dataset):
    """The items of a tensor file (x, y), as a user's dataset reading files would give them."""
    classes = ["a", "b", "c"]
    def __init__(self, path):
        self.x, self.y = torch.load(path)
    def __len__(self):
        return len(self.y)
    def __getitem__(self, i):
        return self.x[i], int(self.y[i])

def data(train, test):
    return Saved(train), Saved(test)
'''


def _save_split(path: Path, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    torch.save((torch.randn(n, 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1), y), path)


@pytest.fixture
def user_module(user_module_from):
    """A user module (model and dataset factories) on sys.path, and the tensor files its dataset reads."""
    folder = user_module_from(MODULE, FACTORIES).parent
    _save_split(folder / "train.pt", 60, 0)
    _save_split(folder / "test.pt", 30, 1)
    return folder


def _user_cfg(folder: Path) -> RunConfig:
    return RunConfig(study="mine", model=f"{MODULE}:net", dataset=f"{MODULE}:data",
                     dataset_args={"train": str(folder / "train.pt"), "test": str(folder / "test.pt")},
                     subset=1.0, epochs=2, batch_size=20, probe_every=0, sharpness_every=0, pass_sharpness=False,
                     local_smoothness_samples=20, sharpness_samples=20, device="cpu")


def _interrupted(cfg: RunConfig, root: Path) -> Path:
    """A run as a kill after its last checkpoint leaves it (no ``done``)."""
    outcome = train_run(cfg, root)
    assert outcome.status == RunState.DONE
    (outcome.path / "done").unlink()
    return outcome.path


def test_resume_after_editing_the_model_factory_is_refused_and_code_json_kept(tmp_path, user_module):
    cfg = _user_cfg(user_module)
    run = _interrupted(cfg, tmp_path)
    code, dataset = (run / "code.json").read_bytes(), (run / "dataset.json").read_bytes()
    records = (run / "records.jsonl").read_bytes()
    source = user_module / f"{MODULE}.py"
    source.write_text(source.read_text().replace("nn.ReLU()", "nn.Tanh()"))
    with pytest.raises(StoreError) as err:
        train_run(cfg, tmp_path, resume=True)
    message = str(err.value)
    assert "\n" not in message
    assert f"the model factory {MODULE}:net changed since this run started (code.json sha256" in message
    assert str(source.resolve()) in message and "restore the code" in message
    assert (run / "code.json").read_bytes() == code and (run / "dataset.json").read_bytes() == dataset
    assert (run / "records.jsonl").read_bytes() == records and not is_done(run)


def test_resume_with_a_changed_import_string_dataset_is_refused(tmp_path, user_module):
    cfg = _user_cfg(user_module)
    run = _interrupted(cfg, tmp_path)
    dataset = (run / "dataset.json").read_bytes()
    assert len(json.loads(dataset)["fingerprint"]) == 64
    _save_split(user_module / "train.pt", 60, 7)     # same files, same factory: other images
    plugins._user_splits.cache_clear()               # (a resume is a new process)
    with pytest.raises(StoreError, match=rf"the dataset {MODULE}:data changed since this run started "
                                         r"\(dataset.json fingerprint .*restore the data"):
        train_run(cfg, tmp_path, resume=True)
    assert (run / "dataset.json").read_bytes() == dataset and not is_done(run)


def test_resume_with_unchanged_code_and_data_finishes(tmp_path, user_module):
    cfg = _user_cfg(user_module)
    run = _interrupted(cfg, tmp_path)
    assert train_run(cfg, tmp_path, resume=True).status == RunState.DONE and check_finished(run) is None


# -- the Tracker ------------------------------------------------------------------------------------------------
CFG = RunConfig(model="mlp", dataset="synthetic", subset=0.1, epochs=2, batch_size=20, optimizer="sgd", lr=0.04,
                probe_every=0, sharpness_every=0, pass_sharpness=False, local_smoothness_samples=20,
                study="own-loop", device="cpu")


def _tracker(root, *, seed=0, model=None, **kw):
    torch.manual_seed(0)
    model = model or torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    opt = torch.optim.SGD(model.parameters(), lr=CFG.lr)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 1, 28, 28, generator=g), torch.randint(10, (40,), generator=g)
    return Tracker(root, model, F.cross_entropy, opt, train_data=(x, y), test_data=(x[:10], y[:10]), config=CFG,
                   **kw), model, opt, (x, y)


def _pass(tracker, model, opt, x, y):
    with tracker.step((x[:20], y[:20])) as s:
        loss = F.cross_entropy(model(x[:20]), y[:20])
        opt.zero_grad()
        loss.backward()
        opt.step()
        s.record(loss)
    tracker.end_epoch()


def test_the_tracker_refuses_more_epochs_than_its_config_has(tmp_path):
    tracker, model, opt, (x, y) = _tracker(tmp_path)
    for _ in range(CFG.epochs):
        _pass(tracker, model, opt, x, y)
    n = len(read_records(tracker.run_dir / "records.jsonl"))
    with pytest.raises(RuntimeError, match=r"end_epoch for pass 3, but the config says epochs=2"):
        tracker.end_epoch()
    assert tracker.epoch == 2 and len(read_records(tracker.run_dir / "records.jsonl")) == n
    tracker.close()
    assert is_done(tracker.run_dir)


def test_a_tracker_closed_early_does_not_finish_the_run_and_says_so(tmp_path):
    tracker, model, opt, (x, y) = _tracker(tmp_path)
    _pass(tracker, model, opt, x, y)
    tracker.checkpoint()
    with pytest.raises(RuntimeError, match=r"closed after 1 of 2 epochs: the run .* is not finished"):
        tracker.close()
    assert not is_done(tracker.run_dir) and not (tracker.run_dir / "weights-final.pt").exists()
    assert run_info(tracker.run_dir)[0] == RunState.INTERRUPTED
    again, model, opt, (x, y) = _tracker(tmp_path)     # the run continues where it was left
    assert again.resume() == {} and again.epoch == 1
    _pass(again, model, opt, x, y)
    again.close()
    assert run_info(again.run_dir)[0] == RunState.DONE


def _checkpointed(root) -> Path:
    tracker, model, opt, (x, y) = _tracker(root)
    _pass(tracker, model, opt, x, y)
    tracker.checkpoint()
    tracker.close_files()
    return tracker.run_dir


def test_tracker_resume_with_other_data_is_refused(tmp_path):
    run = _checkpointed(tmp_path)
    kept = {name: (run / name).read_bytes() for name in ("dataset.json", "tracker.json", "records.jsonl")}
    other, *_ = _tracker(tmp_path, seed=1)
    with pytest.raises(StoreError, match=r"the dataset synthetic changed since this run started \(dataset.json "
                                         r"fingerprint"):
        other.resume()
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_tracker_resume_with_another_model_label_or_class_is_refused(tmp_path):
    run = _checkpointed(tmp_path)
    tracker_json = (run / "tracker.json").read_bytes()
    labelled, *_ = _tracker(tmp_path, model_label="my-net")
    with pytest.raises(StoreError, match=r"the tracked loop's model_label changed since this run started "
                                         r"\(tracker.json model_label 'Sequential' → 'my-net'\)"):
        labelled.resume()

    class Other(torch.nn.Sequential):
        pass
    torch.manual_seed(0)
    other, *_ = _tracker(tmp_path, model=Other(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    # a run is named after its network's class (experiments.tracker.own_model_config): another class is another
    # run, never a resume of this one
    assert other.store.dir != run and other.config.model.endswith(":Other")
    assert (run / "tracker.json").read_bytes() == tracker_json


# -- a finished run whose records were cut --------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    cfg = RunConfig(study="st", dataset="synthetic", subset=0.05, epochs=2, batch_size=32, probe_every=0,
                    sharpness_every=0, pass_sharpness=False, local_smoothness_samples=32, device="cpu")
    return train_run(cfg, root).path


def test_a_finished_run_cut_at_a_line_boundary_is_reported_truncated(finished, tmp_path):
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    assert check_finished(run) is None and run_info(run)[0] == RunState.DONE
    lines = (run / "records.jsonl").read_bytes().splitlines(keepends=True)
    (run / "records.jsonl").write_bytes(b"".join(lines[:len(lines) // 2]))   # whole lines: every record parses
    found = check_finished(run)
    assert found is not None and found.state == RunState.TRUNCATED
    assert "records.jsonl" in found.problem and "the file was cut" in found.problem
    state, detail = run_info(run)
    assert (state, detail) == (RunState.TRUNCATED, found.problem)
    shutil.rmtree(run / "checkpoints")   # the mark is in `done`: the check does not need the checkpoints
    assert check_finished(run).state == RunState.TRUNCATED


def test_a_finished_run_whose_records_changed_is_corrupt(finished, tmp_path):
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    data = (run / "records.jsonl").read_bytes()
    (run / "records.jsonl").write_bytes(data.replace(b'"epoch": 0', b'"epoch": 1', 1))
    assert check_finished(run).state == RunState.CORRUPT and run_info(run)[0] == RunState.CORRUPT


def test_older_finished_runs_are_checked_against_their_checkpoint_or_not_at_all(finished, tmp_path):
    run = tmp_path / finished.name
    shutil.copytree(finished, run)
    (run / "done").write_bytes(b"")          # the empty marker of runs finished before it kept the records mark
    lines = (run / "records.jsonl").read_bytes().splitlines(keepends=True)
    (run / "records.jsonl").write_bytes(b"".join(lines[:3]))
    assert check_finished(run).state == RunState.TRUNCATED   # shorter than the last checkpoint's records
    shutil.rmtree(run / "checkpoints")
    assert check_finished(run) is None                       # nothing to compare with: not checked


COMMITTED = sorted(p.parent for p in RESULTS.glob("*/*/done"))


@pytest.mark.parametrize("run", COMMITTED, ids=[f"{p.parent.name}/{p.name}" for p in COMMITTED])
def test_committed_finished_runs_pass_the_check(run):
    assert check_finished(run) is None
