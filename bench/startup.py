"""Start-up time: how long `trainer train ...` takes to its first optimizer step, and where that time goes.

Runs the real CLI in a fresh process (HOME and the working folder in a temporary directory, as a new user would)
and stops it at the first optimizer step; then once more in the same HOME, as every later run starts. Prints the
time at the end of each start-up phase, and the slowest top-level imports (python -X importtime; lazy imports are
counted where they happen).

    python bench/startup.py                          # the default run: MNIST, resnet10t, wandb offline
    python bench/startup.py --tracker none --data digits

Before/after a change, on a machine whose load drifts: compare two source trees in ONE run, alternating them round
by round (each round: a new HOME, then its first, second and third run), and print the medians:

    git archive BASE_COMMIT | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python bench/startup.py --baseline /tmp/base --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: wraps the engine's phase boundaries with timers and stops at the first optimizer step.
DRIVER = r"""
import time
t0, t0_wall = time.perf_counter(), time.time()
import json, sys
marks = [("imports (torch, accelerate, trainer)", 0.0)]
def mark(label):
    marks.append((label, time.perf_counter() - t0))

class FirstStep(Exception):
    pass

def timed(owner, name, label):
    fn = getattr(owner, name, None)
    if fn is None:  # an older tree (--baseline) without this step
        return
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        mark(label)
        return out
    setattr(owner, name, wrapper)

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from trainer import cli
from trainer.report import reporter
from trainer.train import engine
marks[0] = (marks[0][0], time.perf_counter() - t0)
timed(engine, "build_accelerator", "Accelerator")
timed(engine, "size_kwargs", "model name and size check (imports timm)")
timed(engine.data, "load_splits_in_turn", "dataset (imports datasets)")
timed(engine.data, "load_splits", "dataset (imports datasets)")
timed(engine, "build_model", "model")
timed(engine.data, "build_dataloaders", "transforms and DataLoaders")  # trees before the one pipeline
timed(engine.data, "build_loaders", "transforms and DataLoaders")
timed(engine.optim, "build_scheduler", "prepare loaders, optimizer, schedule")
timed(reporter.Reporter, "start", "prepare model, run folder, config.yaml, trackers")
def first_step(*args):
    mark("first batch + forward/backward + optimizer step")
    raise FirstStep
register_optimizer_step_post_hook(first_step)
try:
    cli.main(sys.argv[1:])
except FirstStep:
    pass
# CPU seconds of this process: the work done, which other processes' load changes far less than wall time.
print("MARKS " + json.dumps({"start": t0_wall, "marks": marks, "cpu": time.process_time()}), flush=True)
"""


def top_imports(stderr: str, n: int = 8) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import time (ms), from python -X importtime output."""
    totals: dict[str, float] = {}
    for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", stderr):
        cumulative_us, indent, name = int(m.group(1)), m.group(2), m.group(3)
        if not indent:
            package = name.split(".")[0]
            totals[package] = totals.get(package, 0.0) + cumulative_us / 1000
    return sorted(totals.items(), key=lambda kv: -kv[1])[:n]


def run_once(args: list[str], home: str, tree: Path = ROOT) -> tuple[dict, float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "HF_"))}
    env.update(HOME=home, PYTHONPATH=str(tree) + os.pathsep + env.get("PYTHONPATH", ""))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", DRIVER, "train", *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MARKS ")), None)
    if line is None:
        sys.exit(f"the run did not reach a training step (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads(line.removeprefix("MARKS "))
    return record, record["start"] - start, proc.stderr


RUNS = ("first", "second", "third")  # in a new HOME: the first run fills caches, later ones reuse them


def compare(args: list[str], baseline: Path, rounds: int) -> None:
    """Time to the first step of `baseline` and of this tree, alternating round by round, with the medians."""
    trees = {"baseline": baseline.resolve(), "this tree": ROOT}
    times: dict[str, dict[str, list[float]]] = {name: {run: [] for run in RUNS} for name in trees}
    cpu: dict[str, dict[str, list[float]]] = {name: {run: [] for run in RUNS} for name in trees}
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for r in range(rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))  # neither tree always goes first
        for name in order:
            with tempfile.TemporaryDirectory() as home:
                row = []
                for run in RUNS:
                    record, interpreter, _ = run_once(args, home, trees[name])
                    marks = record["marks"]
                    times[name][run].append(interpreter + marks[-1][1])
                    cpu[name][run].append(record["cpu"])
                    row.append(f"{run} {times[name][run][-1]:6.2f}s (cpu {record['cpu']:5.2f}s)")
                    if run == "third":
                        previous = 0.0
                        for label, at in marks:
                            phases[name].setdefault(label, []).append(at - previous)
                            previous = at
            print(f"round {r + 1}/{rounds}  {name:<9}  " + "  ".join(row), flush=True)
    for title, values in (("time to the first training step", times), ("CPU time of the process to it", cpu)):
        print(f"\n{title}, medians of {rounds} alternating rounds")
        print(f"{'':<12}" + "".join(f"{run + ' run':>14}" for run in RUNS))
        for name in trees:
            print(f"{name:<12}" + "".join(f"{statistics.median(values[name][run]):>13.2f}s" for run in RUNS))
    print(f"\nthird run by phase (medians)\n{'phase':<52}" + "".join(f"{name:>12}" for name in trees))
    for label in phases["this tree"]:
        cells = [statistics.median(phases[name].get(label, [float("nan")])) for name in trees]
        print(f"{label:<52}" + "".join(f"{cell:>11.2f}s" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--baseline", type=Path, help="another source tree to compare with, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds with --baseline")
    options, args = parser.parse_known_args()
    print(f"trainer train {' '.join(args)}".rstrip())
    if options.baseline:
        compare(args, options.baseline, options.rounds)
        return
    firsts = []
    with tempfile.TemporaryDirectory() as home:
        # A new user's first run fills caches (the built-in set's Arrow copy); every later run starts warm.
        for title in ("first run in a new HOME", "next run, same HOME"):
            record, interpreter, stderr = run_once(args, home)
            marks = record["marks"]
            print(f"\n{title}\n{'phase':<52} {'ends at':>8} {'takes':>7}")
            print(f"{'python interpreter start':<52} {interpreter:>7.2f}s {interpreter:>6.2f}s")
            previous = 0.0
            for label, at in marks:
                print(f"{label:<52} {interpreter + at:>7.2f}s {at - previous:>6.2f}s")
                previous = at
            firsts.append(interpreter + marks[-1][1])
    print(f"\ntime to first training step: {firsts[0]:.2f} s first run, {firsts[1]:.2f} s later runs (goal <= 10 s)")
    print("slowest top-level imports of the later run (cumulative, including lazy ones):")
    for package, ms in top_imports(stderr):
        print(f"  {package:<24} {ms / 1000:6.2f}s")


if __name__ == "__main__":
    main()
