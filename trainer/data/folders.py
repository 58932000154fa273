"""Image folders (ImageFolder / YOLOv5-classify layout): scan, check every file up front, build `datasets` splits.

Files are checked before training starts (header, plus a full decode only for files whose end looks wrong), so an
unreadable image is skipped and reported once instead of killing a run at epoch 37, and every rank sees the same
file list.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trainer.config import UserError
from trainer.data.decode import GRAY_MODES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "valid", "validation": "validation"}
SPLIT_FOLDERS["test"] = "test"
LAYOUT = "expected train/ and val/ (or valid/, validation/, test/) holding one subfolder per class"


@dataclass(frozen=True)
class FolderScan:
    splits: dict  # split name -> datasets.Dataset(image: Image(decode=False) paths, label: ClassLabel)
    class_names: list[str]
    channels: int
    skipped: tuple[tuple[str, str], ...]


def check_image(path: str) -> tuple[str | None, str]:
    """(PIL mode, "") for a readable image, (None, reason) otherwise. Reads the header and the file's last bytes;
    decodes fully only when the end looks cut off (a JPEG without its end marker, a PNG without IEND)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)  # parses the header only
            mode, fmt = img.mode, img.format
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 32))
            tail = f.read()
            suspect = (
                (fmt == "JPEG" and b"\xff\xd9" not in tail)
                or (fmt == "PNG" and b"IEND" not in tail)
                or (fmt == "WEBP" and _riff_size(f) > size)
            )
            if suspect:  # camera JPEGs may carry data after the end marker: only a decode tells
                f.seek(0)
                Image.open(f).load()
        return mode, ""
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        if os.path.getsize(path) == 0:
            return None, "empty file"
        if isinstance(e, Image.UnidentifiedImageError):
            return None, "not an image"
        return None, f"{type(e).__name__}: {e}".split("\n")[0]


def _riff_size(f) -> int:
    f.seek(4)
    return int.from_bytes(f.read(4), "little") + 8


def _list_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, n) for n in sorted(filenames) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _class_files(split_dir: Path, root: Path, where: str) -> dict[str, list[str]]:
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(f"--data {where}: {split_dir.relative_to(root)}/ has no class folders; {LAYOUT}")
    files = {}
    for d in class_dirs:
        files[d.name] = _list_images(d)
        if not files[d.name]:
            rel = d.relative_to(root)
            raise UserError(
                f"--data {where}: class folder {rel}/ has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
    return files


def scan_image_folder(root: Path, where: str) -> FolderScan:
    """Build splits from `root/{train,val,...}/<class>/*.jpg` (or `root/<class>/*.jpg`: one split, held out later)."""
    import datasets

    if not root.is_dir():
        raise UserError(f"--data {where}: not a folder, .parquet or .arrow file")
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    split_dirs = {SPLIT_FOLDERS[d.name.lower()]: d for d in subdirs if d.name.lower() in SPLIT_FOLDERS}
    if not split_dirs:
        if not subdirs or not any(_list_images(d) for d in subdirs):
            raise UserError(f"--data {where}: no images found; {LAYOUT}, or one subfolder per class")
        split_dirs = {"train": root}
    elif "train" not in split_dirs:
        raise UserError(f"--data {where}: found {', '.join(sorted(split_dirs))}/ but no train/ folder; {LAYOUT}")

    files = {split: _class_files(d, root, where) for split, d in split_dirs.items()}
    class_names = sorted(files["train"])
    for split, classes in files.items():
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise UserError(
                f"--data {where}: {split}/ has class folder(s) {', '.join(unknown[:5])} that train/ lacks; "
                "every class needs training images"
            )
    if len(class_names) < 2:
        raise UserError(f"--data {where}: only one class ({class_names[0]}); classification needs at least two")

    paths = [p for classes in files.values() for found in classes.values() for p in found]
    # Header reads are I/O-bound and PIL releases the GIL while decoding: threads overlap them.
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        checked = dict(zip(paths, pool.map(check_image, paths, chunksize=64), strict=True))
    skipped = tuple((p, reason) for p, (mode, reason) in checked.items() if mode is None)
    modes = {mode for mode, _ in checked.values() if mode is not None}

    label = datasets.ClassLabel(names=class_names)
    features = datasets.Features({"image": datasets.Image(decode=False), "label": label})
    splits = {}
    for split, classes in files.items():
        images, labels = [], []
        for name, found in classes.items():
            readable = [str(Path(p).resolve()) for p in found if checked[p][0] is not None]
            if not readable and split == "train":
                raise UserError(f"--data {where}: every image of class {name} in train/ is unreadable")
            images += readable
            labels += [class_names.index(name)] * len(readable)
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return FolderScan(splits, class_names, 1 if modes <= GRAY_MODES else 3, skipped)
