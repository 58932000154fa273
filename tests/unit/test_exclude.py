"""--exclude FILE_LIST: the listed files leave the splits (the others keep theirs), recorded in config.yaml's dataset
record and in the data fingerprint, so a resume notices a changed list."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.config import DataConfig, UserError
from trainer.data import Data, load_splits
from trainer.data.exclude import read_file_list
from trainer.data.fingerprint import data_fingerprint
from trainer.run.manifest import fingerprint_changes


def _folder(root: Path) -> Path:
    for split, count in (("train", 6), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((8, 8), 30 * i + 100 * c, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _audit_csv(path: Path, files: list[str]) -> Path:
    """A list as trainer data audit writes it (label_issues.csv)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "split", "given", "suggested", "score"])
        writer.writerows([[file, "train", "cat", "dog", "0.01"] for file in files])
    return path


def test_file_lists_as_plain_lines_or_a_csv_with_a_file_column(tmp_path):
    (tmp_path / "plain.txt").write_text("# wrong labels\na.png\n\n  b/c.png  \n")
    assert read_file_list(str(tmp_path / "plain.txt")) == ["a.png", "b/c.png"]
    assert read_file_list(str(_audit_csv(tmp_path / "issues.csv", ["x.png", "y.png"]))) == ["x.png", "y.png"]


def test_listed_files_leave_the_splits_and_change_the_fingerprint(tmp_path):
    root = _folder(tmp_path / "pets")
    listed = _audit_csv(tmp_path / "issues.csv", [str((root / "train" / "cat" / "1.png").resolve())])
    (tmp_path / "relative.txt").write_text("train/dog/0.png\nval/cat/1.png\nnot/there.png\n")
    whole, info = load_splits(DataConfig(data=str(root)))
    splits, one = load_splits(DataConfig(data=str(root), exclude=str(listed)))
    _, two = load_splits(DataConfig(data=str(root), exclude=str(tmp_path / "relative.txt")))

    assert (info.train_size, one.train_size, one.val_size) == (12, 11, 4)
    assert (two.train_size, two.val_size) == (11, 3)  # relative to the data folder; the unknown line matches nothing
    assert one.excluded == (str((root / "train" / "cat" / "1.png").resolve()),)
    assert one.exclusion == f"--exclude {listed}: listed files left out (1 from train, 0 from val)"
    paths = splits["train"].with_format("arrow")["image"].combine_chunks().field("path").to_pylist()
    assert not any(p.endswith("cat/1.png") for p in paths) and len(paths) == 11
    before = data_fingerprint(DataConfig(data=str(root)), Data(whole, info))
    after = data_fingerprint(DataConfig(data=str(root), exclude=str(listed)), Data(splits, one))
    assert after["excluded"]["files"] == 1
    assert "--exclude left out other files (0 -> 1)" in fingerprint_changes(before, after)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("nothing/here.png\n", "none of its 1 files is an image of --data"),
        (
            "train/cat/0.png\ntrain/cat/1.png\ntrain/cat/2.png\ntrain/cat/3.png\ntrain/cat/4.png\ntrain/cat/5.png\n",
            "class(es) cat have no training images",
        ),
    ],
)
def test_a_list_that_matches_nothing_or_empties_a_class_is_refused(tmp_path, lines, expected):
    root = _folder(tmp_path / "pets")
    (tmp_path / "list.txt").write_text(lines)
    with pytest.raises(UserError, match=re.escape(expected)):
        load_splits(DataConfig(data=str(root), exclude=str(tmp_path / "list.txt")))
