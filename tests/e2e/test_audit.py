"""`trainer data audit` on a digits folder with known mistakes: 8 % of the training labels flipped and five training
images copied into val. The audit ranks the flipped files first, lists the copies as train/val duplicates, continues
after kill -9 in its second fold with the same findings, and runs on 2 gloo ranks.
"""

from __future__ import annotations

import csv
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CPU_2PROC, accelerate_launch, check, clean_env, run, trainer
from wandb_file import read_run

from trainer.config import DataConfig
from trainer.data import load_splits

FLIPPED = 0.08
COPIES = 5
# Short folds of a recipe that learns digits at 16 px (out-of-sample top-1 ~0.9 on the clean labels).
AUDIT = ("--imgsz", "16", "--epochs", "4", "--batch-size", "64", "--lr", "0.005", "--hflip", "0", "--folds", "3")
AUDIT += ("--tracker", "none")


def noisy_digits(root: Path, fraction: float = FLIPPED, copies: int = COPIES, seed: int = 0):
    """scikit-learn's digits as a train/val folder; `fraction` of the training images filed under a wrong class, the
    first `copies` training images copied into val. Returns (flipped training files, [(train file, val copy)])."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    val, train = order[:300], order[300:]
    flipped = set(rng.choice(train, int(fraction * len(train)), replace=False).tolist())
    files = {}
    for split, rows in (("train", train), ("val", val)):
        for i in rows:
            label = int(digits.target[i])
            if i in flipped:
                label = int((label + rng.integers(1, 10)) % 10)
            path = root / split / str(label) / f"img{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
            files[i] = path.resolve()
    pairs = []
    for i in train[:copies]:
        copy = root / "val" / files[i].parent.name / f"copy{i:04d}.png"
        copy.write_bytes(files[i].read_bytes())
        pairs.append((str(files[i]), str(copy.resolve())))
    return {str(files[i]) for i in flipped}, pairs


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("noisy") / "digits"
    return root, *noisy_digits(root)


def test_audit_finds_flipped_labels_and_leaks_and_continues_after_kill(noisy, workdir: Path, monkeypatch):
    root, flipped, pairs = noisy
    check(run(trainer("data", "audit", "--data", str(root), *AUDIT), workdir))
    audit_dir = workdir / "runs" / "audit" / "exp"

    issues = [r for r in rows(audit_dir / "label_issues.csv") if r["split"] == "train"]
    found = [r["file"] for r in issues]
    hits = len(set(found) & flipped)
    precision, recall = hits / len(found), hits / len(flipped)
    print(f"label issues: precision {precision:.3f}, recall {recall:.3f} at {FLIPPED:.0%} flipped (chance {FLIPPED})")
    assert precision > 0.6 and recall > 0.6, (precision, recall)
    ranked = found[: len(flipped)]  # most likely first: the top of the list is mostly flipped files
    assert len(set(ranked) & flipped) / len(flipped) > 0.6
    assert all(float(a["score"]) <= float(b["score"]) for a, b in itertools.pairwise(issues))
    leaks = {(r["file_a"], r["file_b"]) for r in rows(audit_dir / "duplicates.csv") if r["split_a"] != r["split_b"]}
    assert set(pairs) <= leaks
    for r in rows(audit_dir / "duplicates.csv"):
        if (r["file_a"], r["file_b"]) in set(pairs):
            assert (r["split_a"], r["split_b"], float(r["distance"])) == ("train", "val", pytest.approx(0, abs=1e-5))
    assert (audit_dir / "label_issues.png").is_file() and (audit_dir / "duplicates.png").is_file()
    assert "across train and val (leaks)" in (audit_dir / "summary.txt").read_text()
    # The list goes back to training as it is: --exclude leaves those files out.
    monkeypatch.setenv("HOME", str(workdir / "home"))
    listed = rows(audit_dir / "label_issues.csv")
    _, info = load_splits(DataConfig(data=str(root), exclude=str(audit_dir / "label_issues.csv")))
    assert info.train_size == 1497 - sum(r["split"] == "train" for r in listed)
    assert info.val_size == 305 - sum(r["split"] == "val" for r in listed)

    # The same audit killed (SIGKILL: no checkpoint on the way out) once its second fold saved a checkpoint.
    command = trainer("data", "audit", "--data", str(root), *AUDIT, "--name", "killed")
    killed = workdir / "runs" / "audit" / "killed"
    proc = subprocess.Popen(command, cwd=workdir, env=clean_env(workdir / "home"), stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list((killed / "folds" / "fold2" / "checkpoints").glob("step-*")) and time.time() < deadline:
            assert proc.poll() is None, "the audit ended before its second fold saved a checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert (killed / "folds" / "fold1" / "outputs.npz").is_file()
    assert not (killed / "folds" / "fold2" / "outputs.npz").exists()
    resumed = check(run(trainer("data", "audit", "--resume", str(killed)), workdir))
    assert "audit fold 1/3 done before" in resumed.stdout
    assert "audit fold 2/3 resumed" in resumed.stdout and "audit fold 3/3 trained" in resumed.stdout
    for name in ("label_issues.csv", "duplicates.csv", "outliers.csv", "summary.json"):
        assert (killed / name).read_text() == (audit_dir / name).read_text(), name


def test_audit_on_two_ranks(noisy, workdir: Path):
    """2 gloo ranks: the folds train on both (world size 2 in their config.yaml), the copies are found, and the
    findings go to one (offline) wandb run as tables."""
    root, _, pairs = noisy
    quick = ("--imgsz", "16", "--epochs", "1", "--batch-size", "64", "--folds", "2", "--tracker", "wandb")
    check(run(accelerate_launch(CPU_2PROC, "data", "audit", "--data", str(root), *quick), workdir))
    audit_dir = workdir / "runs" / "audit" / "exp"
    for k in (1, 2):
        record = yaml.safe_load((audit_dir / "folds" / f"fold{k}" / "config.yaml").read_text())
        assert record["launch"]["num_processes"] == 2
    leaks = {(r["file_a"], r["file_b"]) for r in rows(audit_dir / "duplicates.csv") if r["split_a"] != r["split_b"]}
    assert set(pairs) <= leaks
    assert len(rows(audit_dir / "label_issues.csv")) > 0
    offline = list((audit_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and not list((audit_dir / "folds").glob("*/wandb"))  # the folds log nothing
    files = read_run(next(offline[0].glob("run-*.wandb"))).files
    for table in ("label_issues", "duplicates", "outliers"):
        assert any(p.startswith(f"media/table/audit/{table}_") for p in files), (table, files)
