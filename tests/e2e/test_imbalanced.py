"""An imbalanced digit set (8 training images of 8 and of 9, 120 of every other digit; a balanced validation
split): class weights and the balanced sampler each raise the rare classes' recall over a plain run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from conftest import check, run, trainer

RARE = ("8", "9")
TRAIN = ("--model", "test_resnet", "--imgsz", "16", "--batch-size", "32", "--epochs", "4", "--tracker", "none")


def _write_imbalanced(root: Path) -> Path:
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))})
    rows = {"train": [], "validation": []}
    for c in range(10):
        mine = np.flatnonzero(digits.target == c)
        keep = 8 if str(c) in RARE else 120
        rows["train"] += [(images[i], c) for i in mine[:keep]]
        rows["validation"] += [(images[i], c) for i in mine[-40:]]
    splits = {
        name: datasets.Dataset.from_dict({"image": [i for i, _ in r], "label": [c for _, c in r]}, features=features)
        for name, r in rows.items()
    }
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def _rare_recall(run_dir: Path) -> float:
    with open(run_dir / "per_class.csv") as f:
        rows = {r["class"]: r for r in csv.DictReader(f)}
    assert {"precision", "recall", "f1"} <= set(rows["0"])
    return float(np.mean([float(rows[c]["recall"]) for c in RARE]))


def test_class_weights_and_balanced_sampler_raise_rare_class_recall(tmp_path: Path):
    (tmp_path / "home").mkdir()
    _write_imbalanced(tmp_path / "imbalanced")
    recall = {}
    for name, options in (
        ("plain", ()),
        ("weighted", ("--class-weights", "inv_freq")),
        ("balanced", ("--balanced-sampler",)),
    ):
        check(run(trainer("train", "--data", "imbalanced", "--name", name, *TRAIN, *options), tmp_path))
        recall[name] = _rare_recall(tmp_path / "runs" / "train" / name)
    assert recall["weighted"] > recall["plain"] + 0.1, recall
    assert recall["balanced"] > recall["plain"] + 0.1, recall
