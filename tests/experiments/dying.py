"""Make a run's process die at a chosen point, for the launcher's crash tests.

``Bomb(mode, run_dir)`` is passed to ``launchers.launch`` as ``data_dir``: it travels to every process that runs a
task inside the task's arguments and, when unpickled there, arms itself and turns into ``None`` (so the run reads
its data as usual). This works with any process executor that pickles tasks, whatever it imports in its children
(a monkeypatch in the test process would not reach them). Modes:

``now``          exit at once, before the run starts or sends anything;
``mid-run``      exit once ``run_dir`` has records written by this process (the run is under way);
``idle-after``   exit 0.3 s after this process finished ``run_dir`` (its `done` exists and its result is sent);
``at-result``    exit instead of sending the run's result (after the run finished and wrote `done`);
``torn-result``  send half of the result message, then exit.
"""
import os
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

EXIT_CODE = 3


class Bomb:
    def __init__(self, mode: str, run_dir=None):
        self.mode, self.run_dir = mode, None if run_dir is None else str(run_dir)

    def __reduce__(self):
        return arm, (self.mode, self.run_dir)


def _started_here(run_dir: Path) -> bool:
    try:
        return f" pid={os.getpid()} " in (run_dir / "run.log").read_text()
    except OSError:
        return False


def _when(condition, delay: float = 0.0) -> None:
    def watch():
        while not condition():
            time.sleep(0.005)
        time.sleep(delay)
        os._exit(EXIT_CODE)
    threading.Thread(target=watch, daemon=True).start()


def arm(mode: str, run_dir):
    run_dir = None if run_dir is None else Path(run_dir)
    if mode == "now":
        os._exit(EXIT_CODE)
    elif mode == "mid-run":
        _when(lambda: (run_dir / "records.jsonl").exists() and _started_here(run_dir))
    elif mode == "idle-after":
        _when(lambda: (run_dir / "done").exists() and _started_here(run_dir), delay=0.3)
    elif mode in ("at-result", "torn-result"):
        send = Connection.send

        def send_or_die(self, obj):
            if isinstance(obj, tuple) and obj and obj[0] == "result":
                if mode == "torn-result":
                    import pickle
                    import struct
                    payload = pickle.dumps(obj)
                    os.write(self.fileno(), struct.pack("!i", len(payload)) + payload[:len(payload) // 2])
                os._exit(EXIT_CODE)
            return send(self, obj)
        Connection.send = send_or_die
    else:
        raise ValueError(mode)
    return None
