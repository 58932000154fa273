"""Image folders with a `labels.csv` beside their images (`filename,labels`, labels separated by --label-delimiter,
as Kaggle's Planet and fastai's `from_csv` read it): ROOT/labels.csv (one split) or ROOT/<split>/labels.csv. Each
image's list of labels becomes a multi-hot row in the standardisation after (data/multilabel.py).

Held to what class folders are held to: every file is checked up front (`imagecheck`; an unreadable one is skipped
and listed), a file appears once (a repeated row is refused, so no image lands on both sides of a split), cells are
stripped, and what the folder holds besides the CSV (class subfolders, a split folder without a labels.csv) is said.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from trainer.config import UserError
from trainer.data.decode import GRAY_MODES, IMAGE_EXTENSIONS
from trainer.data.sources.imagecheck import check_image, quick_mode
from trainer.data.sources.standard import Source

LABELS_CSV = "labels.csv"
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
# A first row naming its columns (Planet's `image_name,tags`, fastai's `fname,labels`, ...), not a file.
FILE_HEADERS = {"filename", "file", "fname", "image", "image_name", "image_id", "img", "path", "name", "id"}
LABEL_HEADERS = {"labels", "label", "tags", "tag", "classes", "class", "categories", "target"}
OTHER_DELIMITERS = (",", ";", "|", " ", "\t")


def labels_csv_splits(root: Path) -> dict[str, Path] | None:
    """{split: labels.csv} of a tagged folder: ROOT/labels.csv (one split), or ROOT/<split>/labels.csv; else None."""
    if (root / LABELS_CSV).is_file():
        return {"train": root / LABELS_CSV}
    found = {name: root / name / LABELS_CSV for name in SPLIT_NAMES if (root / name / LABELS_CSV).is_file()}
    return found or None


def read_labels_csv(path: Path, delimiter: str, where: str) -> tuple[list[str], list[list[str]]]:
    """(image paths, label lists) of one labels.csv; refuses missing files, empty label cells and repeated files,
    naming them. Cells are stripped; a file named without its extension (Planet's `train_0`) is found by it."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and len(rows[0]) >= 2 and _is_header(rows[0]):
        rows = rows[1:]
    if not rows or any(len(r) < 2 for r in rows):
        raise UserError(f"--data {where}: {path.name} needs two columns, filename,labels, one row per image")
    folder = path.parent
    names = [r[0].strip() for r in rows]
    files = [_image_file(folder, name) for name in names]
    labels = [[t.strip() for t in r[1].split(delimiter) if t.strip()] for r in rows]
    rel = path.relative_to(folder.parent)
    missing = [n for n, file in zip(names, files, strict=True) if not os.path.isfile(file)]
    if missing:
        raise UserError(
            f"--data {where}: {rel} names {len(missing)} file(s) that do not exist ({_few(missing)}); fix the CSV or "
            "add the images"
        )
    empty = [n for n, tags in zip(names, labels, strict=True) if not tags]
    if empty:
        raise UserError(
            f"--data {where}: {rel} has {len(empty)} row(s) with no labels ({_few(empty)}); give each image one "
            "label or more"
        )
    seen: set[str] = set()
    repeated = []
    for name, file in zip(names, files, strict=True):
        real = os.path.realpath(file)
        if real in seen:
            repeated.append(name)
        seen.add(real)
    if repeated:
        raise UserError(
            f"--data {where}: {rel} lists {len(set(repeated))} file(s) more than once ({_few(repeated)}); keep one "
            "row per image with all its labels"
        )
    return files, labels


def load_labels_csv(root: Path, delimiter: str, where: str) -> Source:
    """Splits {name: Dataset(image paths, label lists)} of a folder with labels.csv, unreadable files skipped; the
    class names come from the training split's labels when the standardisation after reads them."""
    import datasets

    tags = datasets.List(datasets.Value("string"))
    features = datasets.Features({"image": datasets.Image(decode=False), "labels": tags})
    splits, skipped, modes, owner, notes = {}, [], set(), {}, []
    for name, path in labels_csv_splits(root).items():
        files, labels = read_labels_csv(path, delimiter, where)
        for file in files:
            other = owner.setdefault(os.path.realpath(file), name)
            if other != name:
                raise UserError(
                    f"--data {where}: {file} is listed in both {other}/{LABELS_CSV} and {name}/{LABELS_CSV}; an "
                    "image belongs to one split"
                )
        kept, kept_labels = [], []
        for file, row in zip(files, labels, strict=True):
            mode, reason = _check(file)
            if reason:
                skipped.append((file, reason))
                continue
            modes.add(mode)
            kept.append(file)
            kept_labels.append(row)
        splits[name] = datasets.Dataset.from_dict({"image": kept, "labels": kept_labels}, features=features)
        notes += _delimiter_hint(path, labels, delimiter)
    notes += _ignored(root, splits, owner)
    channels = (1 if modes <= GRAY_MODES else 3) if modes else None
    return Source(splits, [], f"folder:{where} (labels.csv)", channels, tuple(skipped), notes=tuple(notes))


def _is_header(row: list[str]) -> bool:
    return row[0].strip().lower() in FILE_HEADERS and row[1].strip().lower() in LABEL_HEADERS


def _image_file(folder: Path, name: str) -> str:
    """FOLDER/NAME; a name without an image extension whose file is missing: the one FOLDER/NAME.ext that exists."""
    file = str(folder / name)
    if os.path.isfile(file) or os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        return file
    suffixes = (*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS))
    found = [file + ext for ext in suffixes if os.path.isfile(file + ext)]
    return found[0] if len(found) == 1 else file


def _check(file: str) -> tuple[str | None, str]:
    """(mode, "") of a readable image, (None, why) of one that is not: the class-folder scan's check."""
    try:
        size = os.path.getsize(file)
    except OSError as e:
        return None, e.strerror or "cannot read"
    mode = quick_mode(file, size)
    return (mode, "") if mode else check_image(file)


def _delimiter_hint(path: Path, labels: list[list[str]], delimiter: str) -> list[str]:
    """A hint when labels hold another delimiter (`even,` or `big,round` split by spaces): one class per cell."""
    values = {t for row in labels for t in row}
    for other in OTHER_DELIMITERS:
        holding = sorted(v for v in values if other in v or v.endswith(other))
        if other != delimiter and holding and len(holding) * 4 >= len(values):
            shown = ", ".join(repr(v) for v in holding[:3])
            return [
                f"warning: {path.name}: {len(holding)} of {len(values)} label(s) hold {other!r} ({shown}); if its "
                f"cells are {other!r}-separated, add --label-delimiter {other!r}"
            ]
    return []


def _ignored(root: Path, splits: dict, listed: dict) -> list[str]:
    """What the folder holds that labels.csv does not use: split folders without a labels.csv, subfolders of images
    no row names."""
    notes = []
    if "train" in splits and "val" not in splits and not (root / LABELS_CSV).is_file():
        unused = [n for n in SPLIT_NAMES if n not in splits and (root / n).is_dir()]
        if unused:
            notes.append(
                f"warning: {', '.join(f'{n}/' for n in unused)} has no {LABELS_CSV}: not used for validation (a "
                "share of train is held out instead); give it a labels.csv to validate on it"
            )
    one_split = (root / LABELS_CSV).is_file()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (one_split or p.name not in SPLIT_NAMES))
    unlisted = []
    for sub in folders:
        images = [f for f in sub.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
        if images and not any(os.path.realpath(f) in listed for f in images):
            unlisted.append(f"{sub.name}/")
    if unlisted:
        notes.append(
            f"warning: {LABELS_CSV} labels this folder, and its subfolder(s) {_few(unlisted)} hold images it does not "
            "list: they are not used (class folders and a labels.csv are two layouts; keep one)"
        )
    return notes


def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")
