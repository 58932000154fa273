"""What a run trains on, in a few numbers and digests (`data_fingerprint`), recorded in every checkpoint so that
`--resume` sees whether the data under the same `--data` changed: sample counts per split and per class, the class
names, a digest of each class's file names (folders and other path-based data), the folder scan's listing key (every
file's path, size and modification time; for images read from files no scan listed, a labels.csv folder's, the same
key made here), and the names and sizes of shard files. Multi-label data: positives per class and one digest of the
file names with their label rows."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from trainer.config import DataConfig
from trainer.data.exclude import image_paths
from trainer.data.multilabel import label_matrix
from trainer.data.sources import BUILTIN, data_files
from trainer.data.sources.scancache import stored_listing
from trainer.data.splits import labels_of

VERSION = 1


def data_fingerprint(cfg: DataConfig, data) -> dict:
    """The fingerprint of `data` (a `trainer.data.Data`), as plain JSON values. Costs one read of the label and path
    columns (a few ms for 5,000 images)."""
    info = data.info
    found = {
        "version": VERSION,
        "source": info.source,
        "classes": list(info.class_names),
        "train_images": int(info.train_size),
        "val_images": int(info.val_size),
    }
    per_class: dict[str, list[int]] = {}
    class_files: dict[str, dict[str, str]] = {}
    on_disk: list[str] = []
    for split, dataset in data.splits.items():
        if not hasattr(dataset, "with_format") or not hasattr(dataset, "cache_files"):  # a stream: counts only
            continue
        paths = image_paths(dataset)
        if info.multilabel:  # positives per class; one digest of every file name with its label row
            rows = label_matrix(dataset)
            per_class[split] = [int(n) for n in rows.sum(axis=0)]
            if paths is not None:
                class_files[split] = {"*": _rows_digest(paths, rows)}
        else:
            labels = labels_of(dataset)
            per_class[split] = [int(n) for n in np.bincount(labels, minlength=len(info.class_names))]
            if paths is not None:
                class_files[split] = _class_digests(paths, labels, info.class_names)
        listing = stored_listing(dataset)
        if listing:
            found["listing"] = listing
        on_disk += _disk_paths(dataset)
    if "listing" not in found and on_disk:  # images read from files (a labels.csv folder): list them as a scan does
        found["listing"] = _stat_listing(on_disk)
    if info.excluded:  # --exclude: which files were left out (a changed list changes the data)
        found["excluded"] = {"files": len(info.excluded), "digest": _names_digest(info.excluded)}
    found["images_per_class"] = per_class
    found["class_files"] = class_files  # split -> class -> digest of its file names, in the split's order
    files = data_files(cfg.data) if cfg.data not in BUILTIN else None
    if files is not None:
        found["shards"] = {os.path.basename(f): size for f, size, _ in files.stamp()}
    return found


def _class_digests(paths: list[str], labels, class_names: list[str]) -> dict[str, str]:
    """Class -> digest of its file names, in the split's order."""
    digests: dict[str, hashlib._Hash] = {}
    for label, path in zip(labels.tolist(), paths, strict=True):
        name = f"{os.path.basename(path)}\n".encode("utf-8", "surrogateescape")
        digests.setdefault(class_names[label], hashlib.sha1()).update(name)
    return {name: digest.hexdigest()[:16] for name, digest in sorted(digests.items())}


def _names_digest(paths) -> str:
    digest = hashlib.sha1()
    for path in paths:
        digest.update(f"{path}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _rows_digest(paths: list[str], rows) -> str:
    """One digest of every file name with its multi-hot label row, in the split's order."""
    digest = hashlib.sha1()
    for row, path in zip(rows, paths, strict=True):
        digest.update(f"{os.path.basename(path)} {row.tobytes().hex()}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _stat_listing(paths: list[str]) -> str:
    """A digest of every image file's path, size and modification time (the class-folder scan's listing key, for
    files no scan listed): a file swapped, replaced or rewritten under the same name changes it."""
    digest = hashlib.sha1(b"files-v1")
    for path in sorted(set(paths)):
        try:
            stat = os.stat(path)
            stamp = f"{stat.st_size} {stat.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


def _disk_paths(dataset) -> list[str]:
    """The paths of a split's images that are read from files (stored without their bytes)."""
    column = dataset.with_format("arrow")["image"].combine_chunks()
    if not hasattr(column, "field"):
        return []
    paths, stored = column.field("path").to_pylist(), column.field("bytes").is_null().to_pylist()
    return [p for p, from_file in zip(paths, stored, strict=True) if p and from_file]
