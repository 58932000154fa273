"""Multi-label data: which label columns hold lists, the class names they use, and the one stored form every
multi-label split takes (`multi_hot`: a fixed-length int8 list per image, `Batch.labels` float (B, C) once
collated). Read by the standardisation of every source (`sources.standard`), the splits and the fingerprint; the
image folder with a `labels.csv` is a source kind of its own (`sources.labels_csv`).
"""

from __future__ import annotations

import re

import numpy as np

from trainer.config import UserError


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
    return sorted({_cell(v) for row in train_values for v in (row or [])} - {""}, key=natural_key)


def _cell(value) -> str:
    """A label value as a class name: stripped, so `' big'` and `'big'` are one class; "" (and None): no label."""
    return "" if value is None else str(value).strip()


def multi_hot(split, label_col: str, names: list[str], where: str, split_name: str):
    """`split` with its list column `label_col` replaced by `label`: one int8 0/1 per class, in `names` order."""
    import datasets

    feature = split.features[label_col]
    by_index = isinstance(getattr(feature, "feature", None), datasets.ClassLabel)
    index = {n: i for i, n in enumerate(names)}
    rows = split.with_format("arrow")[label_col].to_pylist()
    table = np.zeros((len(rows), len(names)), dtype=np.int8)
    unknown, outside = set(), set()
    for r, row in enumerate(rows):
        for value in row or []:
            if by_index:  # ClassLabel's -1 is "no label": never an index (table[r, -1] would be the last class)
                k = int(value)
                if k == -1:
                    continue
                if not 0 <= k < len(names):
                    outside.add(k)
                    continue
            else:
                name = _cell(value)
                if not name:  # an empty string in a list: no label
                    continue
                k = index.get(name)
                if k is None:
                    unknown.add(name)
                    continue
            table[r, k] = 1
    if outside:
        raise UserError(
            f"--data {where}: split {split_name!r} has label index(es) {', '.join(map(str, sorted(outside)[:5]))} "
            f"outside its {len(names)} class names (0..{len(names) - 1}, or -1 for no label); fix the label column"
        )
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


def label_matrix(dataset) -> np.ndarray:
    """The multi-hot label column as one (N, C) int8 array, read through Arrow."""
    column = dataset.with_format("arrow")["label"]
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.int8)
