"""Multi-label data held to what class folders are held to (issue 26): labels read once and never as an index they
are not, the class check on the split that trains, a labels.csv folder's files in the data fingerprint, and what a
folder holds besides its CSV said in the header."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from trainer.config import DataConfig, UserError
from trainer.data import Data
from trainer.data.fingerprint import data_fingerprint
from trainer.data.splits import label_counts, load_splits
from trainer.run.manifest import fingerprint_changes

sys.path.append(str(Path(__file__).resolve().parents[1] / "e2e"))  # the e2e data helpers
from multilabel_data import write_tagged_folder


def _fingerprint(cfg: DataConfig) -> dict:
    return data_fingerprint(cfg, Data(*load_splits(cfg)))


def test_swapped_images_of_a_labels_csv_folder_change_its_fingerprint(tmp_path):
    """Two image files swapped between rows, labels.csv untouched: the resume check sees it (it saw nothing)."""
    root = write_tagged_folder(tmp_path / "tags", count=40)
    cfg = DataConfig(data=str(root))
    before = _fingerprint(cfg)
    assert _fingerprint(cfg) == before
    a, b = root / "img_0003.png", root / "img_0004.png"
    a.rename(root / "swap.png")
    b.rename(a)
    (root / "swap.png").rename(b)
    assert fingerprint_changes(before, _fingerprint(cfg)) == [
        "files replaced or rewritten in the folder: sizes or modification times differ"
    ]


def _saved(root: Path, splits: dict[str, list], names: list[str], multilabel: bool) -> str:
    label = datasets.ClassLabel(names=names)
    column = "labels" if multilabel else "label"
    features = datasets.Features({"image": datasets.Image(), column: datasets.Sequence(label) if multilabel else label})
    rng = np.random.default_rng(0)
    made = {}
    for name, labels in splits.items():
        images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in labels]
        made[name] = datasets.Dataset.from_dict({"image": images, column: labels}, features=features)
    datasets.DatasetDict(made).save_to_disk(str(root))
    return str(root)


def test_minus_one_in_a_sequence_of_classlabel_is_no_label(tmp_path):
    """`-1` inside Sequence(ClassLabel) is "no label": support per class is the true count (it became the last
    class: `round` got 282 positives where 240 are real). (An index past the names HF's ClassLabel refuses itself.)"""
    names = ["even", "odd", "round"]
    train = [[0, -1], [1], [2], [0, 2], [-1, 1], [0], [1, 2], [2, -1], [0, 1], [1]] * 3
    val = [[0], [1], [2], [0, 1]]
    cfg = DataConfig(data=_saved(tmp_path / "s", {"train": train, "validation": val}, names, True))
    splits, info = load_splits(cfg)
    true = [sum(k in row for row in train) for k in range(3)]
    assert label_counts(splits["train"], info).tolist() == true == [12, 15, 12]


def test_an_unlabelled_test_split_is_not_validation(tmp_path):
    """A single-label set whose `test` split is all -1 (unlabelled, a common convention): a share of train is held
    out instead, said in a warning (it was the validation split and the fingerprint raised a ValueError)."""
    train = [i % 3 for i in range(60)]
    cfg = DataConfig(data=_saved(tmp_path / "s", {"train": train, "test": [-1] * 12}, ["a", "b", "c"], False))
    splits, info = load_splits(cfg)
    assert info.val_size == 6 and info.train_size == 54 and "held out" in info.val_split
    assert any("split 'test' has no labels (every label -1): it is not a validation split" in n for n in info.notes)
    assert label_counts(splits["val"], info).tolist() == [2, 2, 2]
    assert data_fingerprint(cfg, Data(splits, info))["images_per_class"]["val"] == [2, 2, 2]
    with pytest.raises(UserError, match="--val-split test has no labels"):
        load_splits(DataConfig(data=cfg.data, val_split="test"))
    partly = _saved(tmp_path / "p", {"train": train, "test": [0, -1, 1, 2]}, ["a", "b", "c"], False)
    with pytest.raises(UserError, match=r"split 'test' has 1 of 4 image\(s\) without a label \(-1\)"):
        load_splits(DataConfig(data=partly))


def _write_csv(root: Path, rows: list[tuple[str, str]], header: str = "filename,labels") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, _ in rows:
        file = root / name
        if not file.exists() and "." in name:
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(file)
    (root / "labels.csv").write_text("\n".join([header, *(f'{n},"{t}"' for n, t in rows)]) + "\n")
    return root


def test_the_class_check_runs_after_the_hold_out(tmp_path):
    """A label present only in held-out rows is refused (it trained with zero positives and counted in mAP)."""
    count, fraction = 20, 0.2
    seed = next(
        s for s in range(100) if 7 in np.random.default_rng(s).permutation(count)[: math.ceil(fraction * count)]
    )
    rows = [(f"i{n}.png", "rare cat" if n == 7 else ("cat" if n % 2 else "dog")) for n in range(count)]
    root = _write_csv(tmp_path / "t", rows)
    cfg = DataConfig(data=str(root), val_fraction=fraction, split_seed=seed)
    with pytest.raises(UserError, match=r"class\(es\) rare have no training images once the validation share"):
        load_splits(cfg)


def test_labels_csv_rows_are_stripped_unique_and_hinted(tmp_path):
    """`big, round` with --label-delimiter , makes `big` and `round` (not ' round'); comma cells under the default
    delimiter get a hint; a file listed twice is one line."""
    rows = [(f"i{n}.png", ["big, round", "small, even", "big,even"][n % 3]) for n in range(12)]
    root = _write_csv(tmp_path / "c", rows)
    splits, info = load_splits(DataConfig(data=str(root), label_delimiter=","))
    assert info.class_names == ["big", "even", "round", "small"]
    assert label_counts(splits["train"], info).sum() + label_counts(splits["val"], info).sum() == 24
    _, spaced = load_splits(DataConfig(data=str(root)))
    assert any("hold ','" in n and "add --label-delimiter ','" in n for n in spaced.notes), spaced.notes
    twice = _write_csv(tmp_path / "d", [*rows, ("i0.png", "small")])
    with pytest.raises(UserError, match=r"labels.csv lists 1 file\(s\) more than once \(i0.png\)"):
        load_splits(DataConfig(data=str(twice), label_delimiter=","))


def test_what_a_labels_csv_folder_holds_besides_its_csv(tmp_path):
    """A Planet-style header and extensionless names load; an unreadable image is skipped and listed (class folders
    did, labels.csv folders did not); class subfolders beside labels.csv and a val/ without one are said."""
    rows = [(f"train_{n}", "haze primary" if n % 2 else "clear") for n in range(20)]
    root = tmp_path / "planet"
    root.mkdir()
    rng = np.random.default_rng(2)
    for name, _ in rows:
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"{name}.jpg")
    _write_csv(root, rows, header="image_name,tags")
    (root / "train_3.jpg").write_bytes(b"not an image")
    (root / "cats").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "cats" / "c.png")
    _, info = load_splits(DataConfig(data=str(root)))
    assert info.class_names == ["clear", "haze", "primary"] and info.train_size + info.val_size == 19
    assert [os.path.basename(p) for p, _ in info.skipped] == ["train_3.jpg"]
    assert any("subfolder(s) cats/ hold images it does not list" in n for n in info.notes), info.notes
    split_root = tmp_path / "splits"
    _write_csv(split_root / "train", [(f"i{n}.png", "a b" if n % 2 else "a") for n in range(10)])
    (split_root / "val").mkdir()
    _, info = load_splits(DataConfig(data=str(split_root)))
    assert any("val/ has no labels.csv: not used for validation" in n for n in info.notes), info.notes


def test_an_empty_string_in_a_parquet_list_is_no_class(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "tags": datasets.List(datasets.Value("string"))})
    png = Image.fromarray(np.zeros((8, 8), np.uint8))
    tags = [["a", ""], ["b", " a"], [""], ["b"]] * 5
    rows = {"image": [png] * len(tags), "tags": tags}
    (tmp_path / "p").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "p" / "train.parquet"))
    splits, info = load_splits(DataConfig(data=str(tmp_path / "p"), label_column="tags"))
    assert info.class_names == ["a", "b"]
    total = label_counts(splits["train"], info) + label_counts(splits["val"], info)
    assert total.tolist() == [10, 10]
