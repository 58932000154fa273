"""What `trainer data audit` costs and finds: its wall time against one training of the same recipe, measured side
by side (alternating rounds, the same data, the same machine), and the precision and recall of its label issues on
scikit-learn's digits with 2 %, 5 % and 10 % of the training labels flipped.

K folds train on (K-1)/K of the images each: K x (K-1)/K = K-1 trainings' worth of steps, plus K prediction passes
over train and val and cleanlab at the end. Every run is the real CLI in a fresh process.

    python bench/audit_cost.py --quick      # 3 folds x 4 epochs, one timing round: about 4 minutes on 2 busy cores
    python bench/audit_cost.py              # 5 folds x 6 epochs, three timing rounds
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPE = ("--imgsz", "16", "--batch-size", "64", "--lr", "0.005", "--hflip", "0", "--tracker", "none")


def noisy_digits(root: Path, fraction: float, seed: int = 0) -> set[str]:
    """Digits as a train/val folder (300 val), `fraction` of the training images filed under a wrong class; returns
    the flipped files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    val, train = order[:300], order[300:]
    flipped = set(rng.choice(train, round(fraction * len(train)), replace=False).tolist())
    wrong = set()
    for split, rows in (("train", train), ("val", val)):
        for i in rows:
            label = int(digits.target[i])
            if i in flipped:
                label = int((label + rng.integers(1, 10)) % 10)
            path = root / split / str(label) / f"img{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
            if i in flipped:
                wrong.add(str(path.resolve()))
    return wrong


def timed(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: trainer {' '.join(args)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def scores(issues_csv: Path, flipped: set[str]) -> tuple[float, float, int]:
    with open(issues_csv) as f:
        found = [r["file"] for r in csv.DictReader(f) if r["split"] == "train"]
    hits = len(set(found) & flipped)
    return hits / max(len(found), 1), hits / max(len(flipped), 1), len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 folds x 4 epochs, one timing round")
    parser.add_argument("--folds", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    folds = args.folds or (3 if args.quick else 5)
    epochs = args.epochs or (4 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 3)
    recipe = (*RECIPE, "--epochs", str(epochs))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {f: work / f"noise{round(f * 100)}" for f in (0.02, 0.05, 0.10)}
        flipped = {f: noisy_digits(folder, f) for f, folder in data.items()}
        timing = str(data[0.05])
        train_s, audit_s = [], []
        for r in range(rounds):  # alternate the order so that load drifts hit both alike
            order = ("train", "audit") if r % 2 == 0 else ("audit", "train")
            for what in order:
                if what == "train":
                    train_s.append(timed(["train", "--data", timing, *recipe, "--name", f"t{r}"], work))
                else:
                    name = f"a{r}"
                    command = ["data", "audit", "--data", timing, *recipe, "--folds", str(folds), "--name", name]
                    audit_s.append(timed(command, work))
            ratio = audit_s[-1] / train_s[-1]
            print(f"round {r + 1}: train {train_s[-1]:.1f}s  audit {audit_s[-1]:.1f}s  ratio {ratio:.2f}", flush=True)
        train_m, audit_m = statistics.median(train_s), statistics.median(audit_s)
        print(
            f"audit ({folds} folds x {epochs} epochs) {audit_m:.1f}s vs one training {train_m:.1f}s: "
            f"x{audit_m / train_m:.2f} (steps alone: x{folds - 1}); medians of {rounds} round(s), digits at 16 px, "
            "resnet10t",
            flush=True,
        )
        print(f"{'flipped':>8} {'flagged':>8} {'precision':>10} {'recall':>8}")
        for fraction, folder in data.items():
            if fraction == 0.05:
                issues = work / "runs" / "audit" / "a0" / "label_issues.csv"
            else:
                name = f"n{round(fraction * 100)}"
                command = ["data", "audit", "--data", str(folder), *recipe, "--folds", str(folds), "--name", name]
                timed(command, work)
                issues = work / "runs" / "audit" / name / "label_issues.csv"
            precision, recall, flagged = scores(issues, flipped[fraction])
            print(f"{fraction:>8.0%} {flagged:>8d} {precision:>10.3f} {recall:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
