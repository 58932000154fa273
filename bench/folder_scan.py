"""Start-up on large image folders: the first scan, a later run's, a changed folder's, and memory per file.

Generates folders of small JPEGs (32x32, about 1.4 KB; 100 classes in train/ plus a val/ tenth, as ImageNet is laid
out), then times `load_splits` (all of a run's data preparation) for a folder, each in a fresh process with its own
empty HF datasets cache: the first scan (every file listed and checked), a later run over the unchanged folder (the
listing is compared with the stored scan, which is memory-mapped), and a rescan after 1 % of the files were added
and 0.1 % removed (only the new files are checked). Memory: the growth of the process's anonymous memory (RssAnon)
across `load_splits`, per file, and the size of the stored Arrow splits per file.

    python bench/folder_scan.py                       # 10,000 and 100,000 training images (+ a tenth in val/)
    python bench/folder_scan.py --sizes 1000000       # 4.4 GB of small files; generating takes about a minute
    python bench/folder_scan.py --against ../other  # also the first scan of another checkout's trainer
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: one load_splits over the folder, timed, with the files it opened counted.
DRIVER = r"""
import json, os, resource, sys, time

def memory_kb():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0])
    return fields

import datasets
from trainer.config import DataConfig
from trainer.data import load_splits
try:
    from trainer.data.sources import classfolder
    check_files = classfolder._check_files
    opened = []
    classfolder._check_files = lambda files: opened.extend(files) or check_files(files)
except (ImportError, AttributeError):  # an older trainer: no count
    opened = None
before = memory_kb()
start = time.perf_counter()
splits, info = load_splits(DataConfig(data=sys.argv[1]))
seconds = time.perf_counter() - start
after = memory_kb()
files = info.train_size + info.val_size + len(info.skipped)
print(json.dumps({
    "seconds": seconds, "files": files, "opened": None if opened is None else len(opened),
    "anon_bytes_per_file": (after["RssAnon"] - before["RssAnon"]) * 1024 / files,
    "peak_bytes_per_file": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before["VmRSS"]) * 1024 / files,
}))
"""


def small_jpegs(count: int = 64, size: int = 32) -> list[bytes]:
    """Distinct noise JPEGs: writing their bytes is much faster than encoding a JPEG per file."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def write_folder(root: Path, count: int, classes: int) -> Path:
    """`root/train/class_k/i.jpg` (count files) and `root/val/class_k/i.jpg` (count / 10); reused if complete."""
    marker = root / f".complete-{count}-{classes}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    blobs = small_jpegs()
    for split, n in (("train", count), ("val", count // 10)):
        for k in range(classes):
            (root / split / f"class_{k:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            with open(root / split / f"class_{i % classes:03d}" / f"{i:07d}.jpg", "wb") as f:
                f.write(blobs[i % len(blobs)])
    marker.touch()
    return root


def measure(folder: Path, cache: Path, pythonpath: Path = ROOT) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
    # cwd: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH.
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(folder)], env=env, cwd=cache.parent, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"load_splits failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def change(folder: Path, count: int, classes: int) -> tuple[list[Path], list[tuple[Path, bytes]]]:
    """Add 1 % new training files and remove 0.1 %; returns what to undo."""
    blobs = small_jpegs(4)
    added = [folder / "train" / f"class_{i % classes:03d}" / f"new_{i:07d}.jpg" for i in range(count // 100)]
    for i, path in enumerate(added):
        path.write_bytes(blobs[i % len(blobs)])
    removed = [folder / "train" / f"class_{i % classes:03d}" / f"{i:07d}.jpg" for i in range(0, count, 1000)]
    kept = [(path, path.read_bytes()) for path in removed]
    for path in removed:
        path.unlink()
    return added, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="training images per folder")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "trainer-bench-folders"))
    parser.add_argument("--against", type=Path, help="another checkout whose first scan to time alongside")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    rows = []
    for count in args.sizes:
        folder = write_folder(Path(args.root) / f"jpegs-{count}", count, args.classes)
        with tempfile.TemporaryDirectory() as tmp:
            first = measure(folder, Path(tmp) / "cache")
            later = measure(folder, Path(tmp) / "cache")
            added, removed = change(folder, count, args.classes)
            try:
                changed = measure(folder, Path(tmp) / "cache")
                changed_later = measure(folder, Path(tmp) / "cache")
            finally:
                for path in added:
                    path.unlink()
                for path, content in removed:
                    path.write_bytes(content)
            arrow = sum(p.stat().st_size for p in Path(tmp, "cache").rglob("*.arrow") if p.name != "files.arrow")
            baseline = measure(folder, Path(tmp) / "other", args.against) if args.against else None
        files = first["files"]
        rows.append((files, first, later, changed, changed_later, arrow / files, baseline))
        print(
            f"{files:>9,} files: first scan {first['seconds']:6.2f} s ({first['opened']:,} opened), "
            f"later run {later['seconds']:5.2f} s ({later['opened']} opened), "
            f"after +1 %/-0.1 % files {changed['seconds']:5.2f} s ({changed['opened']:,} opened), "
            f"then {changed_later['seconds']:5.2f} s; "
            f"file list {first['anon_bytes_per_file']:.0f} B/file anonymous after the first scan "
            f"({first['peak_bytes_per_file']:.0f} B/file peak), {later['anon_bytes_per_file']:.0f} B/file "
            f"in a later run, Arrow splits {arrow / files:.0f} B/file on disk"
            + (f"; {args.against}: first scan {baseline['seconds']:.2f} s" if baseline else ""),
            flush=True,
        )
    files, first, later = rows[-1][:3]
    print(
        f"per file at {files:,}: first scan {first['seconds'] / files * 1e6:.1f} us, later run "
        f"{later['seconds'] / files * 1e6:.1f} us; linear extrapolation to 1,281,167 files (ImageNet): "
        f"first scan {first['seconds'] / files * 1281167:.0f} s, later run {later['seconds'] / files * 1281167:.1f} s"
    )
    load = max(load, os.getloadavg()[0])
    print(f"load average up to {load:.1f} on {os.cpu_count()} CPUs" + (": measured under load" if load > 1 else ""))


if __name__ == "__main__":
    main()
