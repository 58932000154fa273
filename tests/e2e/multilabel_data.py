"""A multi-label set made from the embedded digits: 16x16 images, each a 2x2 grid of 8x8 cells holding 1-3 distinct
digits (the other cells black); an image's labels are the digits in it. Written as an image folder with a labels.csv
(filename,labels) and as a `save_to_disk` folder with a `Sequence(ClassLabel)` column (the hub's form)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [str(i) for i in range(10)]


def digit_grids(count: int, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """(count, 16, 16) uint8 images and their sorted label lists."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    cells = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    by_class = [np.flatnonzero(digits.target == c) for c in range(10)]
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 16, 16), np.uint8)
    labels = []
    for n in range(count):
        chosen = rng.choice(10, size=int(rng.integers(1, 4)), replace=False)
        places = rng.choice(4, size=len(chosen), replace=False)
        for digit, place in zip(chosen, places, strict=True):
            row, col = divmod(int(place), 2)
            images[n, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = cells[rng.choice(by_class[digit])]
        labels.append(sorted(int(d) for d in chosen))
    return images, labels


def write_tagged_folder(root: Path, count: int = 600, seed: int = 0) -> Path:
    """ROOT/labels.csv and ROOT/img_N.png (one split: the run holds out its validation)."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = digit_grids(count, seed)
    lines = ["filename,labels"]
    for n, (image, tags) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / f"img_{n:04d}.png")
        lines.append(f"img_{n:04d}.png,{' '.join(CLASSES[t] for t in tags)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def write_saved(root: Path, train: int = 600, val: int = 200, seed: int = 0) -> Path:
    """A DatasetDict (train, validation) with `image` and `labels: Sequence(ClassLabel)`, via save_to_disk."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "labels": datasets.Sequence(datasets.ClassLabel(names=CLASSES))}
    )
    splits = {}
    for name, count, offset in (("train", train, 0), ("validation", val, 1)):
        images, labels = digit_grids(count, seed + offset)
        splits[name] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(i) for i in images], "labels": labels}, features=features
        )
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root
