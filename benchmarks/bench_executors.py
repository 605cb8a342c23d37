"""Sweep throughput of the three executors on the same 8 short runs.

    python benchmarks/bench_executors.py                  # about 3-5 minutes on 2 idle cores
    python benchmarks/bench_executors.py --subset 1      # longer runs: less start-up in the numbers

The sweep: convnet and bn-convnet x 4 seeds, 1 pass over a subset of the synthetic set (or --dataset
fashion-mnist), with line probes every 5 steps and the per-epoch measurements (eval, local smoothness, sharpness) at
small sizes. It is timed under

* serial with 1 thread (the default for every executor: a run's numbers must not depend on the executor, see
  experiments/launchers.py) and with 2 threads (what serial could use on 2 cores, at the price of other numbers),
* process with 2 workers x 1 thread,
* Ray with 2 workers x 1 thread: once including the start of the local cluster (what `--executor ray` costs) and
  once on a cluster already started (what a long sweep costs per run).

Each configuration runs in a fresh Python process (nothing cached from another); "launch" is the time of
``launchers.launch`` (workers' start-up and imports included), "process" the whole child process (interpreter and
torch import too, as a user's command would). Throughput is runs per minute of launch time. Targets (issue 6):
process >= 1.6 x serial; Ray within 15 % of process. Writes benchmarks/results/executors.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = {  # key: (label, executor, workers, threads, warm Ray cluster)
    "serial-1t": ("serial, 1 thread", "serial", 1, 1, False),
    "serial-2t": ("serial, 2 threads", "serial", 1, 2, False),
    "process-1w": ("process, 1 worker x 1 thread", "process", 1, 1, False),   # not run by default: start-up cost
    "process-2w": ("process, 2 workers x 1 thread", "process", 2, 1, False),
    "ray-2w-cold": ("ray, 2 workers x 1 thread (incl. cluster start)", "ray", 2, 1, False),
    "ray-2w-warm": ("ray, 2 workers x 1 thread (warm cluster)", "ray", 2, 1, True),
}


def sweep_runs(args):
    from experiments.config import RunConfig, StudyConfig
    base = RunConfig(dataset=args.dataset, subset=args.subset, epochs=1, batch_size=32, probe_every=5,
                     sharpness_samples=64, local_smoothness_samples=128, device="cpu", study="bench")
    return StudyConfig(name="bench", models=("convnet", "bn-convnet"), lrs=(0.04,), seeds=(0, 1, 2, 3),
                       base=base).runs()


def child(args) -> None:
    """One timed sweep in this (fresh) process; prints a JSON line."""
    _, executor, workers, threads, warm = MODES[args.child]
    from experiments.launchers import launch
    runs = sweep_runs(args)
    ray_setup = 0.0
    if warm:
        import ray
        t = time.perf_counter()
        ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_setup = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        results = launch(runs, Path(root), executor=executor, workers=workers, threads=threads, quiet=True)
        seconds = time.perf_counter() - t
        train = []
        for r in results:
            timing = json.loads((Path(root) / r.run_id / "timing.json").read_text())
            train.append(timing["total"])
    if warm:
        ray.shutdown()
    print(json.dumps({"launch": seconds, "statuses": sorted({r.status for r in results}), "n": len(results),
                      "run_seconds": sum(train), "ray_setup": ray_setup}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--subset", type=float, default=0.5)
    parser.add_argument("--modes", default=",".join(m for m in MODES if m != "process-1w"),
                        help=f"comma-separated, from: {', '.join(MODES)}")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "executors.md")
    parser.add_argument("--note", default="", help="a line about the machine's state, written to the results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
        if MODES[mode][1] == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print(f"{mode}: skipped (Ray is not installed: pip install 'smoothness-lab[ray]')")
                continue
        load = os.getloadavg()[0]
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--dataset", args.dataset,
                              "--subset", str(args.subset)], capture_output=True, text=True)
        total = time.perf_counter() - t
        if out.returncode != 0:
            sys.exit(f"{mode} failed:\n{out.stderr}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if res["statuses"] != ["done"]:
            sys.exit(f"{mode}: runs ended as {res['statuses']}")
        row = {"mode": MODES[mode][0], "launch": res["launch"], "total": total, "ray_setup": res["ray_setup"],
               "run_seconds": res["run_seconds"], "n": res["n"], "load": load,
               "rpm": 60 * res["n"] / res["launch"], "rpm_total": 60 * res["n"] / total}
        rows.append(row)
        print(f"{row['mode']:48s} launch {row['launch']:6.1f} s  ({row['rpm']:5.1f} runs/min)   whole process "
              f"{total:6.1f} s  ({row['rpm_total']:5.1f} runs/min)   load {load:.1f}", flush=True)

    by = {r["mode"]: r for r in rows}
    ratios = []

    def ratio(label, a, b, target=None, key="rpm"):
        if a in by and b in by:
            value = by[a][key] / by[b][key]
            ratios.append((label, value, target))
            print(f"{label:60s} {value:5.2f}" + (f"   (target {target})" if target else ""))

    ratio("process / serial (1 thread)", "process, 2 workers x 1 thread", "serial, 1 thread", ">= 1.6")
    ratio("process / serial (2 threads)", "process, 2 workers x 1 thread", "serial, 2 threads")
    ratio("process with 1 worker / serial (1 thread): executor overhead", "process, 1 worker x 1 thread",
          "serial, 1 thread")
    ratio("ray (incl. cluster start) / process", "ray, 2 workers x 1 thread (incl. cluster start)",
          "process, 2 workers x 1 thread", ">= 0.85")
    ratio("ray (warm cluster) / process", "ray, 2 workers x 1 thread (warm cluster)",
          "process, 2 workers x 1 thread", ">= 0.85")
    ratio("process / serial (1 thread), whole process", "process, 2 workers x 1 thread", "serial, 1 thread",
          ">= 1.6", key="rpm_total")
    write_markdown(args, rows, ratios)


def write_markdown(args, rows, ratios) -> None:
    import torch
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    lines = [
        "# Executor throughput (benchmarks/bench_executors.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}: {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, Ray {ray_version}.",
        "",
        f"Sweep: convnet and bn-convnet x seeds 0-3 = 8 runs, 1 pass over {args.subset:g} of {args.dataset}, batch 32, "
        "probe every 5 steps, eval + local smoothness (128 images) + sharpness (64 images) at init and after the pass, "
        "CPU.",
        "",
        "| executor | launch (s) | runs/min | whole process (s) | runs/min (whole) | sum of run times (s) "
        "| load avg at start |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['launch']:.1f} | {r['rpm']:.1f} | {r['total']:.1f} | {r['rpm_total']:.1f} | "
                     f"{r['run_seconds']:.1f} | {r['load']:.1f} |")
    lines += ["", "| ratio (runs/min) | value | target |", "|---|---:|---|"]
    for label, value, target in ratios:
        lines.append(f"| {label} | {value:.2f} | {target or ''} |")
    warm = next((r for r in rows if "warm" in r["mode"]), None)
    if warm:
        lines += ["", f"Starting the local Ray cluster took {warm['ray_setup']:.1f} s (outside the warm row's "
                  "launch time)."]
    if args.note:
        lines += ["", args.note]
    lines += ["", "\"launch\" times `launchers.launch` (worker start-up and imports included); \"whole process\" the "
              "child Python process that ran it (interpreter and torch import too). Serial runs with 1 thread by "
              "default, like every executor, so that records do not depend on the executor."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
