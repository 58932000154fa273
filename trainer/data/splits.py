"""Train and validation splits of a loaded source, the class checks, and what the run learns about the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.config import DataConfig, UserError
from trainer.data.decode import GRAY_MODES, UnreadableImage, decode_image
from trainer.data.sources import TRAIN_SPLITS, VAL_SPLITS, load_source


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the run needs to know about the data."""

    class_names: list[str]
    channels: int
    train_size: int
    val_size: int
    source: str
    default_hflip: float
    val_split: str = ""  # where validation comes from, in words (recorded in config.yaml)
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of unreadable files left out up front


def load_splits(cfg: DataConfig):
    """Load the dataset named by `cfg.data` and return ({"train", "val"} datasets, DataInfo).

    Refuses (UserError) data that cannot train a classifier: no images, one class, a class without training images.
    """
    if cfg.streaming:  # streamed training data: its own module (a lazy import: streaming sits above this one)
        from trainer.data.streaming import load_stream_splits

        return load_stream_splits(cfg)
    source = load_source(cfg)
    names = list(source.splits)
    train_name = cfg.train_split or next((n for n in TRAIN_SPLITS if n in names), names[0])
    val_name = cfg.val_split or next((n for n in VAL_SPLITS if n in names and n != train_name), "")
    for flag, name in (("--train-split", train_name), ("--val-split", val_name)):
        if name and name not in names:
            raise UserError(f"--data {cfg.data}: {flag} {name!r} is not a split; splits: {', '.join(names)}")
    train = source.splits[train_name]
    _check_classes(train, source.class_names, cfg.data)
    if val_name:
        val, val_desc = source.splits[val_name], f"split {val_name}"
    else:
        try:
            # Stratified, seeded hold-out: every class keeps its share in both splits, identically on every rank.
            held = train.train_test_split(test_size=cfg.val_fraction, stratify_by_column="label", seed=cfg.split_seed)
        except ValueError as e:
            raise UserError(
                f"--data {cfg.data}: cannot hold out --val-fraction {cfg.val_fraction} per class ({e}); "
                "add a validation split or more images"
            ) from e
        train, val = held["train"], held["test"]
        val_desc = f"{cfg.val_fraction:g} of {train_name} held out, stratified, --split-seed {cfg.split_seed}"
    if len(val) == 0:
        raise UserError(f"--data {cfg.data}: the validation split {val_name!r} has no images")
    info = DataInfo(
        class_names=source.class_names,
        channels=source.channels or _guess_channels(train),
        train_size=len(train),
        val_size=len(val),
        source=source.description,
        default_hflip=source.default_hflip,
        val_split=val_desc,
        skipped=source.skipped,
    )
    return {"train": train, "val": val}, info


def _check_classes(train, class_names: list[str], where: str) -> None:
    if len(train) == 0:
        raise UserError(f"--data {where}: no training images")
    if len(class_names) < 2:
        raise UserError(f"--data {where}: only one class ({', '.join(class_names)}); classification needs two or more")
    counts = np.bincount(np.asarray(train["label"], dtype=np.int64), minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise UserError(f"--data {where}: class(es) {', '.join(empty[:5])} have no training images")


def _guess_channels(train, sample: int = 16) -> int:
    """1 when the first images are all grayscale, else 3 (palette, RGBA and CMYK become RGB)."""
    modes = set()
    for value in train.select(range(min(sample, len(train))))["image"]:
        try:
            modes.add(decode_image(value).mode)
        except UnreadableImage:
            continue
    return 1 if modes and modes <= GRAY_MODES else 3


def unreadable_warning(info: DataInfo, shown: int = 3) -> str:
    """The one warning about files skipped up front: how many, and the first few."""
    first = "; ".join(f"{path} ({reason})" for path, reason in info.skipped[:shown])
    return f"warning: skipped {len(info.skipped)} unreadable image file(s): {first}" + (
        " ..." if len(info.skipped) > shown else ""
    )
