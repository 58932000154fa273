"""Image folders (ImageFolder / YOLOv5-classify layout): scan, check every file once per folder state, build splits.

Files are checked before training starts, so an unreadable image is skipped and reported once instead of killing a
run at epoch 37, and every rank sees the same file list. The result (splits as Arrow files, skipped files, channels)
is kept in the HF datasets cache under `trainer-folders-v2/`, keyed on the folder's listing: every folder's name and
every image file's path, size and modification time. A later run, or another rank of the same job, re-lists the
folder (one stat per file) and memory-maps the stored splits instead of opening every file again. A changed listing
(a file added, removed, renamed, replaced or rewritten) is rescanned; files whose path, size and modification time
are unchanged keep their earlier check result, so only new and changed files are opened. Not noticed: a file rewritten
in place with the same size and the same modification time (which copies, downloads, editors and `touch` never do).
Every cached file carries a checksum (sha256, in scan.json), verified before it is used: a damaged or read-only cache
only costs a rescan, with one line when a checksum differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trainer.config import UserError
from trainer.data.decode import GRAY_MODES, IMAGE_EXTENSIONS, jpeg_markers, unreadable_reason

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "valid", "validation": "validation"}
SPLIT_FOLDERS["test"] = "test"
LAYOUT = "expected train/ and val/ (or valid/, validation/, test/) holding one subfolder per class"
# Bump when what a check decides or what the cache holds changes: older entries are then ignored (v2: the pixel
# limit). The listing key keeps its own seed, so a resume across the bump still sees the same data.
CACHE_FORMAT = "trainer-folders-v2"
LISTING_SEED = "trainer-folders-v1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}  # IHDR colour type -> PIL mode
JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # SOF component count -> PIL mode
BAD_NAME = -2  # the size a listed file carries when its name is not UTF-8: skipped, never opened
BAD_NAME_RESULT = (None, "file name is not valid UTF-8; rename it to use it")
READABLE: dict[str, tuple[str, str]] = {}  # mode -> the check result of a readable file of that mode
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class FolderScan:
    splits: dict  # split name -> datasets.Dataset(image: Image(decode=False) paths, label: ClassLabel)
    class_names: list[str]
    channels: int
    skipped: tuple[tuple[str, str], ...]
    checked: int = 0  # files opened by this scan: 0 when an earlier scan of the unchanged folder was reused


def check_image(path: str) -> tuple[str | None, str]:
    """(PIL mode, "") for a readable image, (None, reason) otherwise. Reads the header and the file's last bytes;
    decodes fully only when the end looks cut off (a JPEG without its end marker, a PNG without IEND)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)  # parses the header only (and raises DecompressionBombError above twice the limit)
            mode, fmt = img.mode, img.format
            oversized = too_many_pixels(*img.size)
            if oversized:
                return None, oversized
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
        if os.path.exists(path) and os.path.getsize(path) == 0:
            return None, "empty file"
        return None, unreadable_reason(e)


def too_many_pixels(width: int, height: int) -> str:
    """Why an image is skipped for its size (a decompression bomb), or "" when it is within PIL's
    `Image.MAX_IMAGE_PIXELS` (89.5 M pixels unless changed; None: no limit). Decoding one would need width x height
    x channels bytes in every worker that draws it."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= limit:
        return ""
    return f"{width}x{height} pixels, above the limit of {limit} (PIL's Image.MAX_IMAGE_PIXELS)"


def _riff_size(f) -> int:
    f.seek(4)
    return int.from_bytes(f.read(4), "little") + 8


def _quick_mode(path: str, size: int) -> str | None:
    """The mode of a well-formed JPEG or PNG from its first 4 KB and last 32 bytes, without PIL (10x cheaper);
    None for anything else or anything odd, which `check_image` then judges."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            head, tail = os.pread(fd, 4096, 0), os.pread(fd, 32, max(0, size - 32))
        finally:
            os.close(fd)
    except OSError:
        return None
    if head.startswith(PNG_SIGNATURE):
        if head[12:16] != b"IHDR" or b"IEND" not in tail or _large(head, 16, 20, 4):
            return None
        return PNG_MODES.get(head[25])
    if not head.startswith(b"\xff\xd8\xff") or b"\xff\xd9" not in tail:
        return None
    for marker, i in jpeg_markers(head):  # up to the frame header, which holds the component count
        if marker in JPEG_SOF:  # FF Cn, length, precision, height, width, components
            return JPEG_MODES.get(head[i + 9]) if i + 10 <= len(head) and not _large(head, i + 7, i + 5, 2) else None
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG PIL opens
            return None
    return None


def _large(head: bytes, w: int, h: int, n: int) -> bool:
    """Whether the big-endian width at `w` and height at `h` of a header (`n` bytes each: 4 in PNG, 2 in JPEG) are
    over the pixel limit: `check_image` then gives the reason."""
    return bool(too_many_pixels(int.from_bytes(head[w : w + n], "big"), int.from_bytes(head[h : h + n], "big")))


def _check_files(files: list[tuple[str, int]]) -> list[tuple[str | None, str]]:
    out = []
    for path, size in files:
        mode = _quick_mode(path, size) if size > 0 else None
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
    cache = _cache_dir(real_root)
    if cache.is_dir():  # a stat per file, without keeping the listing: all a later run over this folder costs
        listing, _ = _listing(root, split_dirs, keep=False, where=where)
        stored = _load_entry(cache / listing[:24], root)
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
    known = _earlier_checks(cache)
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
    if _load_entry(entry, root) is None:  # damaged, if there at all (its check results were used above)
        shutil.rmtree(entry, ignore_errors=True)
    if _store_entry(entry, scan, tables, listing, rows, results):
        stored = _load_entry(entry, root)  # every rank and every later run then reads the same files
        if stored is not None:
            scan = stored
    return FolderScan(scan.splits, scan.class_names, scan.channels, scan.skipped, len(todo))


def _features(class_names: list[str]):
    import datasets

    return datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=class_names)})


def _build(root: Path, real_root: str, files: dict, results: list) -> tuple[FolderScan, dict]:
    """The scan's splits (in memory), its skipped files and channels, and each split's Arrow table."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    class_names = sorted(files["train"])
    features = _features(class_names)
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


def _cache_dir(real_root: str) -> Path:
    import datasets

    key = hashlib.sha1(real_root.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(datasets.config.HF_DATASETS_CACHE) / CACHE_FORMAT / key


def _load_entry(entry: Path, root: Path) -> FolderScan | None:
    """The stored scan of one listing, its splits memory-mapped; None when missing or damaged (a file whose checksum
    differs from the one stored with it is damaged: one line says so)."""
    import datasets

    try:
        meta = json.loads((entry / "scan.json").read_text())
        info = datasets.DatasetInfo(features=_features(meta["class_names"]))
        splits = {}
        for split, rows in meta["splits"].items():
            if not _intact(entry / f"{split}.arrow", meta, root):
                return None
            splits[split] = datasets.Dataset.from_file(str(entry / f"{split}.arrow"), info=info.copy())
            if len(splits[split]) != rows:
                return None
        skipped = tuple((os.path.join(root, rel), reason) for rel, reason in meta["skipped"])
        return FolderScan(splits, meta["class_names"], meta["channels"], skipped)
    except Exception:  # json, pyarrow and datasets raise many types for a damaged entry: rescan
        return None


_WARNED: set[str] = set()  # damaged cache files already reported (a scan looks at an entry twice)


def _checksum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _intact(path: Path, meta: dict, root: Path) -> bool:
    """Whether a cached file has the checksum stored with it (an entry without checksums is not trusted)."""
    expected = (meta.get("checksums") or {}).get(path.name)
    if expected is not None and _checksum(path) == expected:
        return True
    if expected is not None and str(path) not in _WARNED:
        _WARNED.add(str(path))
        print(
            f"trainer: warning: the scan cache of {root} is damaged ({path.name} checksum differs); rescanning",
            file=sys.stderr,
            flush=True,
        )
    return False


def _earlier_checks(cache: Path) -> dict[str, tuple[str | None, str]]:
    """ "path\\0size\\0mtime" -> check result, from the newest stored scan of this folder (empty if none)."""
    import pyarrow as pa

    try:
        entries = [p for p in cache.iterdir() if not p.name.startswith(".") and (p / "files.arrow").is_file()]
        if not entries:
            return {}
        newest = max(entries, key=lambda p: p.stat().st_mtime)
        try:
            meta = json.loads((newest / "scan.json").read_text())
        except (OSError, ValueError):
            meta = None  # the check results alone are still worth a try: pyarrow refuses most damage
        if meta is not None and "checksums" in meta and not _intact(newest / "files.arrow", meta, newest):
            return {}
        with pa.memory_map(str(newest / "files.arrow")) as source:
            columns = pa.ipc.open_stream(source).read_all().to_pydict()
        rows = zip(columns["path"], columns["size"], columns["mtime"], columns["mode"], columns["reason"], strict=True)
        return {f"{p}\0{s}\0{m}": (mode or None, reason) for p, s, m, mode, reason in rows}
    except Exception:  # a damaged earlier scan is only a slower rescan
        return {}


def _write_arrow(path: Path, table) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _store_entry(entry: Path, scan: FolderScan, tables: dict, listing: str, rows: list, results: list) -> bool:
    """Write the scan into a temporary folder, then rename it: readers see a complete entry or none. Drops the
    folder's older entries. Best effort: False when the cache cannot be written."""
    import pyarrow as pa

    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    skipped = [(rel, reason) for (rel, _, _), (mode, reason) in zip(rows, results, strict=True) if mode is None]
    meta = {
        "format": CACHE_FORMAT,
        "listing": listing,
        "class_names": scan.class_names,
        "channels": scan.channels,
        "splits": {split: len(table) for split, table in tables.items()},
        "skipped": skipped,
    }
    files = pa.table(
        {
            "path": [r[0] for r in rows],
            "size": pa.array([r[1] for r in rows], pa.int64()),
            "mtime": pa.array([r[2] for r in rows], pa.int64()),
            "mode": [mode or "" for mode, _ in results],
            "reason": [reason for _, reason in results],
        }
    )
    try:
        tmp.mkdir(parents=True)
        for split, table in tables.items():
            _write_arrow(tmp / f"{split}.arrow", table)
        _write_arrow(tmp / "files.arrow", files)
        meta["checksums"] = {p.name: _checksum(p) for p in sorted(tmp.glob("*.arrow"))}
        (tmp / "scan.json").write_text(json.dumps(meta))
        os.rename(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return entry.is_dir()  # another process may have stored the same listing meanwhile
    for other in entry.parent.iterdir():
        try:
            # Older scans of this folder, and temporary folders that a killed scan left (an hour old).
            if other != entry and (not other.name.startswith(".") or time.time() - other.stat().st_mtime > 3600):
                shutil.rmtree(other, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            continue
    return True


def stored_listing(dataset) -> str:
    """The listing key of the folder scan a split was memory-mapped from ("" when it does not come from the cache):
    what a resumed run compares to see that the folder's files are the ones it trained on."""
    for cached in getattr(dataset, "cache_files", None) or []:
        entry = Path(cached["filename"]).parent
        if entry.parent.parent.name == CACHE_FORMAT:
            try:
                return str(json.loads((entry / "scan.json").read_text())["listing"])
            except (OSError, ValueError, KeyError):
                return ""
    return ""
