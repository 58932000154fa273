"""The class-folder scan's cache: its result (splits as Arrow files, skipped files, channels) kept in the HF datasets
cache under `trainer-folders-v2/`, one entry per folder listing (every folder's name and every image file's path,
size and modification time), with every earlier file's check result. Every cached file carries a checksum (sha256,
in scan.json), verified before it is used: a damaged or read-only cache only costs a rescan, with one line when a
checksum differs. Entries are written into a temporary folder and renamed: readers see a complete entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Bump when what a check decides or what the cache holds changes: older entries are then ignored (v2: the pixel
# limit). The listing key keeps its own seed (classfolder.LISTING_SEED), so a resume across the bump still sees the
# same data.
CACHE_FORMAT = "trainer-folders-v2"


@dataclass(frozen=True)
class FolderScan:
    splits: dict  # split name -> datasets.Dataset(image: Image(decode=False) paths, label: ClassLabel)
    class_names: list[str]
    channels: int
    skipped: tuple[tuple[str, str], ...]
    checked: int = 0  # files opened by this scan: 0 when an earlier scan of the unchanged folder was reused


def scan_features(class_names: list[str]):
    import datasets

    return datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=class_names)})


def cache_dir(real_root: str) -> Path:
    import datasets

    key = hashlib.sha1(real_root.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(datasets.config.HF_DATASETS_CACHE) / CACHE_FORMAT / key


def load_entry(entry: Path, root: Path) -> FolderScan | None:
    """The stored scan of one listing, its splits memory-mapped; None when missing or damaged (a file whose checksum
    differs from the one stored with it is damaged: one line says so)."""
    import datasets

    try:
        meta = json.loads((entry / "scan.json").read_text())
        info = datasets.DatasetInfo(features=scan_features(meta["class_names"]))
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


def earlier_checks(cache: Path) -> dict[str, tuple[str | None, str]]:
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


def write_arrow(path: Path, table) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def store_entry(entry: Path, scan: FolderScan, tables: dict, listing: str, rows: list, results: list) -> bool:
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
            write_arrow(tmp / f"{split}.arrow", table)
        write_arrow(tmp / "files.arrow", files)
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
