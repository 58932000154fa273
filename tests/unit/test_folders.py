"""Image folder scans: checked once, reused while the folder is unchanged, rescanned when it changes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import pytest
from PIL import Image
from test_sources import picture, write_broken_files, write_folder

from trainer.config import DataConfig
from trainer.data import load_splits
from trainer.data.sources import classfolder, imagecheck, scancache


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The paths every scan opens to check them, in order."""
    paths: list[str] = []
    check_files = classfolder._check_files

    def spy(files):
        paths.extend(path for path, _ in files)
        return check_files(files)

    monkeypatch.setattr(classfolder, "_check_files", spy)
    return paths


def scan(root: Path) -> scancache.FolderScan:
    return classfolder.scan_image_folder(root, str(root))


def listing(result: scancache.FolderScan) -> dict:
    """Everything a run takes from a scan, as plain values."""
    splits = {name: (list(split["image"]), list(split["label"])) for name, split in result.splits.items()}
    return {"splits": splits, "classes": result.class_names, "channels": result.channels, "skipped": result.skipped}


def test_unchanged_folder_is_checked_once_and_reused(tmp_path, opened):
    root = write_folder(tmp_path / "d", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}})
    broken = write_broken_files(root / "train" / "b")
    first = scan(root)
    assert len(opened) == first.checked == 19 and len(first.skipped) == 3
    del opened[:]
    again = scan(root)
    assert opened == [] and again.checked == 0  # nothing opened: the earlier check results were reused
    assert listing(again) == listing(first)
    assert dict(again.skipped)[str(broken[0])] == "empty file"
    # Memory-mapped from the cache, not rebuilt in memory.
    assert again.splits["train"].cache_files[0]["filename"].startswith(datasets.config.HF_DATASETS_CACHE)
    _, info = load_splits(DataConfig(data=str(root)))
    assert opened == [] and info.train_size == 12 and len(info.skipped) == 3


def test_added_removed_and_replaced_files_are_noticed(tmp_path, opened):
    root = write_folder(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    first = scan(root)
    a = root / "train" / "a"
    picture(200).save(a / "new.jpg")
    del opened[:]
    added = scan(root)
    assert opened == [str((a / "new.jpg").resolve())]  # only the new file is checked
    assert added.splits["train"].num_rows == first.splits["train"].num_rows + 1

    (root / "train" / "b" / "1.png").unlink()
    del opened[:]
    removed = scan(root)
    paths = [image["path"] for image in removed.splits["train"]["image"]]
    assert opened == [] and str((root / "train" / "b" / "0.jpg").resolve()) in paths
    assert str((root / "train" / "b" / "1.png").resolve()) not in paths
    assert removed.splits["train"].num_rows == first.splits["train"].num_rows

    # Replaced by a rename over it (as downloads and rsync do), and rewritten in place: both cut short.
    whole = (a / "0.jpg").read_bytes()
    (a / "tmp").write_bytes(whole[: len(whole) // 2])
    os.replace(a / "tmp", a / "0.jpg")
    with open(a / "2.webp", "r+b") as f:
        f.truncate(40)
    del opened[:]
    replaced = scan(root)
    assert sorted(opened) == sorted(str((a / n).resolve()) for n in ("0.jpg", "2.webp"))
    assert sorted(p for p, _ in replaced.skipped) == [str(a / "0.jpg"), str(a / "2.webp")]
    # A fresh scan (no cache at all) agrees with the incremental one.
    datasets.config.HF_DATASETS_CACHE = str(tmp_path / "other-cache")
    assert listing(scan(root)) == listing(replaced)


def test_a_new_empty_class_folder_is_refused_even_with_a_cached_scan(tmp_path):
    root = write_folder(tmp_path / "d", {"train": {"a": 4, "b": 4}})
    scan(root)
    (root / "train" / "c").mkdir()
    with pytest.raises(classfolder.UserError, match=r"class folder train/c/ has no images"):
        scan(root)


@pytest.mark.parametrize(
    ("damaged", "change", "reopened"),
    [
        (["scan.json"], False, 0),  # rebuilt from the stored check results: nothing reopened
        (["train.arrow"], False, 0),
        (["files.arrow"], True, 11),  # the check results themselves are lost: every file reopened
        (["scan.json", "files.arrow"], False, 10),
    ],
)
def test_damaged_cache_costs_a_rescan(tmp_path, opened, damaged, change, reopened):
    root = write_folder(tmp_path / "d", {"": {"a": 5, "b": 5}})
    first = listing(scan(root))  # read now: the damage below hits the files it maps
    (entry,) = Path(datasets.config.HF_DATASETS_CACHE).glob(f"{scancache.CACHE_FORMAT}/*/*")
    for name in damaged:
        (entry / name).write_bytes((entry / name).read_bytes()[:50])
    if change:
        picture(7).save(root / "a" / "late.png")
    del opened[:]
    rescanned = scan(root)
    assert len(opened) == reopened
    assert rescanned.splits["train"]["label"] == [0] * (6 if change else 5) + [1] * 5
    if not change:
        assert listing(rescanned) == first
    del opened[:]
    assert listing(scan(root)) == listing(rescanned) and opened == []  # the cache is whole again


def test_unwritable_cache_still_scans(tmp_path, monkeypatch, opened):
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "file" / "cache"))
    root = write_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}})
    first = scan(root)
    assert first.splits["train"].num_rows == 6 and first.splits["train"].cache_files == []
    assert scan(root).checked == 8 == len(opened) / 2  # checked again: nothing could be kept


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_quick_check_reads_the_same_mode_as_pil(tmp_path):
    rgb = picture(90, size=40)
    files = {
        "rgb.jpg": _encoded(rgb, "JPEG"),
        "gray.jpg": _encoded(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "progressive.jpg": _encoded(rgb, "JPEG", progressive=True),
        "exif.jpg": _encoded(rgb, "JPEG", exif=Image.Exif().tobytes() + b"x" * 6000),  # frame header after 4 KB
        "gray.png": _encoded(rgb.convert("L"), "PNG"),
        "rgba.png": _encoded(rgb.convert("RGBA"), "PNG"),
        "palette.png": _encoded(rgb.convert("P"), "PNG"),
        "gray_alpha.png": _encoded(rgb.convert("LA"), "PNG"),
        "rgb.webp": _encoded(rgb, "WEBP"),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        path = str(tmp_path / name)
        quick = imagecheck.quick_mode(path, len(content))
        assert classfolder._check_files([(path, len(content))]) == [imagecheck.check_image(path)]
        assert quick in (None, imagecheck.check_image(path)[0]), name
        # The cheap path serves ordinary JPEGs and PNGs; PIL the rest.
        assert (quick is None) == (name in ("exif.jpg", "rgb.webp")), name


@pytest.mark.parametrize("seed", [0, 3])
def test_hold_out_takes_the_indices_of_datasets_stratified_split(seed):
    from trainer.data.splits import hold_out

    labels = [i % 3 for i in range(40)] + [0] * 9
    full = datasets.Dataset.from_dict(
        {"image": [str(i) for i in range(49)], "label": labels},
        features=datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=3)}),
    )
    train, val = hold_out(full, 0.2, seed)
    theirs = full.train_test_split(test_size=0.2, stratify_by_column="label", seed=seed)
    assert train["image"][:] == theirs["train"]["image"][:] and val["image"][:] == theirs["test"]["image"][:]
    assert len(val) == 10 and sorted(set(train["image"][:]) | set(val["image"][:]), key=int) == full["image"][:]


def test_a_changed_folder_replaces_its_cache_entry_and_old_temporary_folders(tmp_path):
    root = write_folder(tmp_path / "d", {"train": {"a": 3, "b": 3}})
    scan(root)
    (old,) = Path(datasets.config.HF_DATASETS_CACHE).glob(f"{scancache.CACHE_FORMAT}/*/*")
    killed, fresh = old.parent / ".x.tmp-1", old.parent / ".y.tmp-2"  # left by killed scans; one still running
    killed.mkdir()
    fresh.mkdir()
    os.utime(killed, (0, 0))
    picture(1).save(root / "train" / "a" / "more.png")
    scan(root)
    left = [p.name for p in old.parent.iterdir()]
    assert len(left) == 2 and fresh.name in left and old.name not in left  # the new entry, the running scan's folder
