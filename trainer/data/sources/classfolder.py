"""Class folders (ImageFolder / YOLOv5-classify layout: `root/{train,val,...}/<class>/*.jpg`, or `root/<class>/*.jpg`):
list the folder, check every file once per folder state, build the splits.

Files are checked before training starts (`imagecheck`), so an unreadable image is skipped and reported once instead
of killing a run at epoch 37, and every rank sees the same file list. The result is kept in the scan cache
(`scancache`), keyed on the folder's listing: every folder's name and every image file's path, size and modification
time. A later run, or another rank of the same job, re-lists the folder (one stat per file) and memory-maps the
stored splits instead of opening every file again. A changed listing (a file added, removed, renamed, replaced or
rewritten) is rescanned; files whose path, size and modification time are unchanged keep their earlier check result,
so only new and changed files are opened. Not noticed: a file rewritten in place with the same size and the same
modification time (which copies, downloads, editors and `touch` never do).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trainer.config import UserError
from trainer.data.decode import GRAY_MODES, IMAGE_EXTENSIONS
from trainer.data.sources.imagecheck import check_image, quick_mode
from trainer.data.sources.scancache import (
    FolderScan,
    cache_dir,
    earlier_checks,
    load_entry,
    scan_features,
    store_entry,
)
from trainer.data.sources.standard import Source

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "valid", "validation": "validation"}
SPLIT_FOLDERS["test"] = "test"
LAYOUT = "expected train/ and val/ (or valid/, validation/, test/) holding one subfolder per class"
# The seed of the listing key: kept when the cache's format changes, so a resume across the bump sees the same data.
LISTING_SEED = "trainer-folders-v1"
BAD_NAME = -2  # the size a listed file carries when its name is not UTF-8: skipped, never opened
BAD_NAME_RESULT = (None, "file name is not valid UTF-8; rename it to use it")
READABLE: dict[str, tuple[str, str]] = {}  # mode -> the check result of a readable file of that mode


def load_class_folder(root: Path, where: str) -> Source:
    """A class folder as a Source, already standard (`image` paths, a ClassLabel `label` from the class folders)."""
    folder = scan_image_folder(root, where)
    return Source(folder.splits, folder.class_names, f"folder:{where}", folder.channels, folder.skipped)


def _check_files(files: list[tuple[str, int]]) -> list[tuple[str | None, str]]:
    out = []
    for path, size in files:
        mode = quick_mode(path, size) if size > 0 else None
        out.append(READABLE.setdefault(mode, (mode, "")) if mode else check_image(path))  # one tuple per mode
    return out


def _list_images(folder: str, rel: str, hasher, keep: list | None, above: tuple[str, ...] = ()) -> int:
    """Count the images under `folder` (its files in name order, then its subfolders, depth first), feed every
    folder name and every image's path, size and mtime to `hasher`, and append (rel path, size, mtime) to `keep`.

    A file name that is not UTF-8 is kept with size BAD_NAME and its name escaped (the scan skips and counts it); an
    unreadable folder and a link back to a folder above it (a loop) are refused in one line naming them."""
    entries = _entries(folder)
    above = (*above, os.path.realpath(folder))
    lines, subdirs = [f"D{rel}"], []
    for e in entries:
        if e.is_dir():
            if not e.name.startswith("."):
                if e.is_symlink() and os.path.realpath(e.path) in above:
                    raise UserError(
                        f"--data: {e.path} links to {os.path.realpath(e.path)}, a folder it is in (a loop); "
                        "remove the link or point it elsewhere"
                    )
                subdirs.append(e)
        elif e.name.lower().endswith(IMAGE_EXTENSIONS):
            try:
                st = e.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # a dangling link: the check says why it cannot be read
                size, mtime = -1, 0
            lines.append(f"{e.name}\0{size}\0{mtime}")
            if keep is not None:
                name = e.name
                if not _is_utf8(name):  # Arrow, the cache and CSV files hold UTF-8 text: skipped, and said
                    name, size = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), BAD_NAME
                keep.append((f"{rel}/{name}", size, mtime))
    hasher.update("\n".join(lines).encode("utf-8", "surrogateescape"))
    count = len(lines) - 1
    for d in subdirs:
        count += _list_images(d.path, f"{rel}/{d.name}", hasher, keep, above)
    return count


def _entries(folder: str) -> list[os.DirEntry]:
    """A folder's entries in name order; an unreadable folder (mode 000, another user's) is one line naming it."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise UserError(
            f"--data: cannot read folder {folder} (permission denied); give it read and search permission "
            "(chmod u+rx) or move it out of the data folder"
        ) from None


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.scandir gave undecodable bytes as surrogates
        return False


def _class_dirs(split_dir: Path, root: Path, where: str) -> list[str]:
    names = [e.name for e in _entries(str(split_dir)) if e.is_dir() and not e.name.startswith(".")]
    if not names:
        raise UserError(f"--data {where}: {split_dir.relative_to(root)}/ has no class folders; {LAYOUT}")
    return names


def _split_dirs(root: Path, where: str) -> dict[str, Path]:
    if not root.is_dir():
        raise UserError(f"--data {where}: not a folder, .parquet or .arrow file")
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    split_dirs = {SPLIT_FOLDERS[d.name.lower()]: d for d in subdirs if d.name.lower() in SPLIT_FOLDERS}
    if not split_dirs:
        if not subdirs or not any(_list_images(str(d), "", hashlib.sha1(), None) for d in subdirs):
            raise UserError(f"--data {where}: no images found; {LAYOUT}, or one subfolder per class")
        return {"train": root}
    if "train" not in split_dirs:
        raise UserError(f"--data {where}: found {', '.join(sorted(split_dirs))}/ but no train/ folder; {LAYOUT}")
    return split_dirs


def _listing(root: Path, split_dirs: dict[str, Path], keep: bool, where: str):
    """(listing hash, {split: {class: [(rel path, size, mtime)] or image count}}); refuses bad layouts."""
    hasher = hashlib.sha1(LISTING_SEED.encode())
    files: dict[str, dict] = {}
    for split, split_dir in split_dirs.items():
        files[split] = {}
        rel_split = os.path.relpath(split_dir, root)
        hasher.update(f"\nS{split}\0{rel_split}".encode())
        for name in _class_dirs(split_dir, root, where):
            found: list | None = [] if keep else None
            above = (os.path.realpath(root), os.path.realpath(split_dir))  # a link back up to these is a loop too
            count = _list_images(str(split_dir / name), os.path.normpath(f"{rel_split}/{name}"), hasher, found, above)
            if not count:
                raise UserError(
                    f"--data {where}: class folder {os.path.normpath(f'{rel_split}/{name}')}/ has no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
                )
            files[split][name] = found if keep else count
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
    return hasher.hexdigest(), files


def scan_image_folder(root: Path, where: str) -> FolderScan:
    """Build splits from `root/{train,val,...}/<class>/*.jpg` (or `root/<class>/*.jpg`: one split, held out later).

    Called through `splits.load_splits_in_turn`: the main process scans and fills the cache, the others reuse it.
    """
    import pyarrow as pa

    split_dirs = _split_dirs(root, where)
    real_root = os.path.realpath(root)
    cache = cache_dir(real_root)
    if cache.is_dir():  # a stat per file, without keeping the listing: all a later run over this folder costs
        listing, _ = _listing(root, split_dirs, keep=False, where=where)
        stored = load_entry(cache / listing[:24], root)
        if stored is not None:
            return stored
    scan = _scan(root, real_root, split_dirs, cache, where)
    pa.default_memory_pool().release_unused()  # the scan's freed Arrow buffers: mimalloc keeps 300 B per file else
    return scan


def _scan(root: Path, real_root: str, split_dirs: dict[str, Path], cache: Path, where: str) -> FolderScan:
    """List and check the folder (only files the cache knows nothing about), store the result, return it."""
    listing, files = _listing(root, split_dirs, keep=True, where=where)  # anew: the folder may change meanwhile
    entry = cache / listing[:24]
    rows = [row for classes in files.values() for found in classes.values() for row in found]
    known = earlier_checks(cache)
    results = [known.get(f"{rel}\0{size}\0{mtime}") for rel, size, mtime in rows] if known else [None] * len(rows)
    del known
    results = [BAD_NAME_RESULT if row[1] == BAD_NAME else r for row, r in zip(rows, results, strict=True)]
    todo = [i for i, result in enumerate(results) if result is None]
    spans = [slice(start, start + 512) for start in range(0, len(todo), 512)]

    def check(span: slice) -> list[tuple[str | None, str]]:
        return _check_files([(os.path.join(real_root, rows[i][0]), rows[i][1]) for i in todo[span]])

    from PIL import Image

    # Images over the pixel limit are skipped and listed with the reason: PIL's warning on opening them would repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # Reads are I/O-bound (os.pread and PIL's file reads release the GIL): threads overlap them on slow disks.
    with ThreadPoolExecutor(max_workers=min(8, 4 * (os.cpu_count() or 1))) as pool:
        for span, checked in zip(spans, pool.map(check, spans), strict=True):
            for i, result in zip(todo[span], checked, strict=True):
                results[i] = result
    scan, tables = _build(root, real_root, files, results)
    if load_entry(entry, root) is None:  # damaged, if there at all (its check results were used above)
        shutil.rmtree(entry, ignore_errors=True)
    if store_entry(entry, scan, tables, listing, rows, results):
        stored = load_entry(entry, root)  # every rank and every later run then reads the same files
        if stored is not None:
            scan = stored
    return FolderScan(scan.splits, scan.class_names, scan.channels, scan.skipped, len(todo))


def _build(root: Path, real_root: str, files: dict, results: list) -> tuple[FolderScan, dict]:
    """The scan's splits (in memory), its skipped files and channels, and each split's Arrow table."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    class_names = sorted(files["train"])
    features = scan_features(class_names)
    tables, skipped, modes, i = {}, [], set(), 0
    for split, classes in files.items():
        rels, labels = [], []
        for name, found in classes.items():
            readable = 0
            for (rel, _, _), (mode, reason) in zip(found, results[i : i + len(found)], strict=True):
                if mode is None:
                    skipped.append((rel, reason))
                else:
                    rels.append(rel)
                    modes.add(mode)
                    readable += 1
            i += len(found)
            if not readable and split == "train":
                raise UserError(f"--data {root}: every image of class {name} in train/ is unreadable")
            labels += [class_names.index(name)] * readable
        paths = pc.binary_join_element_wise(f"{real_root}/", pa.array(rels, pa.string()), "")
        image = pa.StructArray.from_arrays([pa.nulls(len(rels), pa.binary()), paths], names=["bytes", "path"])
        tables[split] = pa.Table.from_arrays([image, pa.array(labels, pa.int64())], schema=features.arrow_schema)
    info = datasets.DatasetInfo(features=features)
    splits = {s: datasets.Dataset(datasets.table.InMemoryTable(t), info=info.copy()) for s, t in tables.items()}
    channels = 1 if modes <= GRAY_MODES else 3
    return FolderScan(splits, class_names, channels, tuple((os.path.join(root, r), why) for r, why in skipped)), tables
