"""Multi-label data: which label columns hold lists, the class names they use, and the one stored form every
multi-label split takes (`multi_hot`: a fixed-length int8 list per image, `Batch.labels` float (B, C) once
collated); and the image folder with a `labels.csv` beside its images (`filename,labels`, labels separated by
--label-delimiter, as Kaggle's Planet and fastai's `from_csv` read it).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from trainer.config import UserError

LABELS_CSV = "labels.csv"
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def natural_key(text: str):
    """ "2" before "10", so numeric labels keep their numeric order as class indices."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def is_list_feature(feature) -> bool:
    """A label column of lists: HF `Sequence(ClassLabel)`/`List(...)`, a Parquet/Arrow list column."""
    import datasets

    return isinstance(feature, datasets.Sequence | datasets.List | datasets.LargeList)


def is_multi_hot(feature) -> bool:
    """The stored form `multi_hot` writes (a fixed-length list of int8)."""
    import datasets

    inner = getattr(feature, "feature", None)
    return is_list_feature(feature) and getattr(feature, "length", -1) > 0 and inner == datasets.Value("int8")


def list_class_names(feature, train_values: list) -> list[str]:
    """Class names of a list column: its ClassLabel's names, else the values seen in training (natural order)."""
    import datasets

    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    return sorted({str(v) for row in train_values for v in (row or [])}, key=natural_key)


def multi_hot(split, label_col: str, names: list[str], where: str, split_name: str):
    """`split` with its list column `label_col` replaced by `label`: one int8 0/1 per class, in `names` order."""
    import datasets

    feature = split.features[label_col]
    by_index = isinstance(getattr(feature, "feature", None), datasets.ClassLabel)
    index = {n: i for i, n in enumerate(names)}
    rows = split.with_format("arrow")[label_col].to_pylist()
    table = np.zeros((len(rows), len(names)), dtype=np.int8)
    unknown = set()
    for r, row in enumerate(rows):
        for value in row or []:
            k = int(value) if by_index else index.get(str(value))
            if k is None:
                unknown.add(str(value))
            else:
                table[r, k] = 1
    if unknown:
        raise UserError(
            f"--data {where}: split {split_name!r} has label(s) {', '.join(sorted(unknown)[:5])} that training "
            "lacks; every class needs training images"
        )
    stored = datasets.Sequence(datasets.Value("int8"), length=len(names))
    return split.remove_columns(label_col).add_column("label", table.tolist(), feature=stored)


def json_labels(splits: dict, label_columns: tuple[str, ...]) -> dict:
    """WebDataset samples whose labels sit in their `.json` member (a list, or an object with a `labels`, `label` or
    `tags` list) and that have no label column of their own: that list becomes the `labels` column."""
    first = next(iter(splits.values()), None)
    feature = first.features.get("json") if first is not None else None
    if feature is None or any(c in first.features for c in label_columns):
        return splits
    if is_list_feature(feature):
        return {name: split.rename_column("json", "labels") for name, split in splits.items()}
    key = next((k for k in ("labels", "label", "tags") if isinstance(feature, dict) and k in feature), None)
    if key is None or not is_list_feature(feature[key]):
        return splits
    return {
        name: split.flatten()
        .rename_column(f"json.{key}", "labels")
        .select_columns([c for c in split.features if c != "json"] + ["labels"])
        for name, split in splits.items()
    }


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


def load_tagged_folder(root: Path, delimiter: str, where: str):
    """Splits {name: Dataset(image paths, label lists)} of a folder with labels.csv; class names from train."""
    import datasets

    tags = datasets.List(datasets.Value("string"))
    features = datasets.Features({"image": datasets.Image(decode=False), "labels": tags})
    splits = {}
    for name, path in labels_csv_splits(root).items():
        files, labels = read_labels_csv(path, delimiter, where)
        splits[name] = datasets.Dataset.from_dict({"image": files, "labels": labels}, features=features)
    return splits


def label_matrix(dataset) -> np.ndarray:
    """The multi-hot label column as one (N, C) int8 array, read through Arrow."""
    column = dataset.with_format("arrow")["label"]
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.int8)
