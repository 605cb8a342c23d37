"""Make a run's process die (or wait) at a chosen point, for the launcher's crash tests.

``Bomb(mode, run_dir, flag)`` is passed to ``launchers.launch`` as ``data_dir``: it travels to every process that
runs a task inside the task's arguments and, when unpickled there, arms itself and turns into ``None`` (so the run
reads its data as usual). This works with any process executor that pickles tasks, whatever it imports in its
children (a monkeypatch in the test process would not reach them). Every point is an event in the run's own code,
never a timer, so a loaded machine changes how long a test takes, not what it sees. Modes:

``now``          exit at once, before the run starts or sends anything;
``mid-run``      exit right after this process appended the first record of ``run_dir`` (the run is under way);
``hold-mid-run`` right after that first record, write this process's pid to the file ``flag`` and wait (up to
                 ``HOLD_S``) for the test to kill it;
``idle-after``   after this process sent the result of ``run_dir``'s run, wait until the file ``flag`` exists
                 (the test creates it), then exit;
``at-result``    exit instead of sending the run's result (after the run finished and wrote `done`);
``torn-result``  send half of the result message, then exit.
"""
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path

EXIT_CODE = 3
HOLD_S = 600.0     # generous: a held or waiting process gives up only long after any test's own deadline


class Bomb:
    def __init__(self, mode: str, run_dir=None, flag=None):
        self.mode = mode
        self.run_dir, self.flag = (None if p is None else str(p) for p in (run_dir, flag))

    def __reduce__(self):
        return arm, (self.mode, self.run_dir, self.flag)


def _started_here(run_dir: Path) -> bool:
    try:
        return f" pid={os.getpid()} " in (run_dir / "run.log").read_text()
    except OSError:
        return False


def _wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + HOLD_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def _after_first_record(run_dir: Path, action) -> None:
    """Call ``action()`` in the run's own thread once it appended its first record to ``run_dir``."""
    from experiments.store import RunStore
    append, target = RunStore.append, run_dir.resolve()

    def append_then_act(self, record):
        append(self, record)
        if Path(self.dir).resolve() == target:
            action()
    RunStore.append = append_then_act


def _hold(flag: Path) -> None:
    flag.write_text(str(os.getpid()))
    time.sleep(HOLD_S)


def _patch_result(on_result) -> None:
    send = Connection.send

    def send_result(self, obj):
        if isinstance(obj, tuple) and obj and obj[0] == "result":
            return on_result(self, obj, send)
        return send(self, obj)
    Connection.send = send_result


def arm(mode: str, run_dir, flag=None):
    run_dir, flag = (None if p is None else Path(p) for p in (run_dir, flag))
    if mode == "now":
        os._exit(EXIT_CODE)
    elif mode == "mid-run":
        _after_first_record(run_dir, lambda: os._exit(EXIT_CODE))
    elif mode == "hold-mid-run":
        _after_first_record(run_dir, lambda: _hold(flag))
    elif mode == "idle-after":
        def send_then_wait(conn, obj, send):
            send(conn, obj)
            if _started_here(run_dir):
                _wait_for_file(flag)
                os._exit(EXIT_CODE)
        _patch_result(send_then_wait)
    elif mode in ("at-result", "torn-result"):
        def die_sending(conn, obj, send):
            if mode == "torn-result":
                import pickle
                import struct
                payload = pickle.dumps(obj)
                os.write(conn.fileno(), struct.pack("!i", len(payload)) + payload[:len(payload) // 2])
            os._exit(EXIT_CODE)
        _patch_result(die_sending)
    else:
        raise ValueError(mode)
    return None
