"""Image folders with a `labels.csv` beside their images (`filename,labels`, labels separated by --label-delimiter,
as Kaggle's Planet and fastai's `from_csv` read it): ROOT/labels.csv (one split) or ROOT/<split>/labels.csv. Each
image's list of labels becomes a multi-hot row in the standardisation after (data/multilabel.py)."""

from __future__ import annotations

import csv
from pathlib import Path

from trainer.config import UserError
from trainer.data.sources.standard import Source

LABELS_CSV = "labels.csv"
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def labels_csv_splits(root: Path) -> dict[str, Path] | None:
    """{split: labels.csv} of a tagged folder: ROOT/labels.csv (one split), or ROOT/<split>/labels.csv; else None."""
    if (root / LABELS_CSV).is_file():
        return {"train": root / LABELS_CSV}
    found = {name: root / name / LABELS_CSV for name in SPLIT_NAMES if (root / name / LABELS_CSV).is_file()}
    return found or None


def read_labels_csv(path: Path, delimiter: str, where: str) -> tuple[list[str], list[list[str]]]:
    """(image paths, label lists) of one labels.csv; refuses missing files and empty label cells, naming them."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["filename", "labels"], ["image", "labels"]):
        rows = rows[1:]
    if not rows or any(len(r) < 2 for r in rows):
        raise UserError(f"--data {where}: {path.name} needs two columns, filename,labels, one row per image")
    folder = path.parent
    files = [str(folder / r[0].strip()) for r in rows]
    labels = [[t for t in r[1].strip().split(delimiter) if t] for r in rows]
    missing = [r[0] for r, file in zip(rows, files, strict=True) if not Path(file).is_file()]
    if missing:
        raise UserError(
            f"--data {where}: {path.relative_to(folder.parent)} names {len(missing)} file(s) that do not exist "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); fix the CSV or add the images"
        )
    empty = [r[0] for r, tags in zip(rows, labels, strict=True) if not tags]
    if empty:
        raise UserError(
            f"--data {where}: {path.relative_to(folder.parent)} has {len(empty)} row(s) with no labels "
            f"({', '.join(empty[:3])}{' ...' if len(empty) > 3 else ''}); give each image one label or more"
        )
    return files, labels


def load_labels_csv(root: Path, delimiter: str, where: str) -> Source:
    """Splits {name: Dataset(image paths, label lists)} of a folder with labels.csv; the class names come from the
    training split's labels when the standardisation after reads them."""
    import datasets

    tags = datasets.List(datasets.Value("string"))
    features = datasets.Features({"image": datasets.Image(decode=False), "labels": tags})
    splits = {}
    for name, path in labels_csv_splits(root).items():
        files, labels = read_labels_csv(path, delimiter, where)
        splits[name] = datasets.Dataset.from_dict({"image": files, "labels": labels}, features=features)
    return Source(splits, [], f"folder:{where} (labels.csv)")
