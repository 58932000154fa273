"""Train and validation splits of a source, map-style or stream, the class checks, and what the run learns about
the data (`DataInfo`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainer.config import DataConfig, UserError
from trainer.data.decode import GRAY_MODES, UnreadableImage, decode_image
from trainer.data.exclude import describe_exclusion, exclude_files
from trainer.data.multilabel import is_list_feature, label_matrix
from trainer.data.sources import (
    check_task,
    detect_columns,
    load_source,
    read_split,
    split_names,
    standard_stream,
    stream_source,
)


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
    excluded: tuple[str, ...] = ()  # --exclude: the paths left out (sorted); `exclusion` says it in words
    exclusion: str = ""
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of unreadable files left out up front
    multilabel: bool = False  # labels are multi-hot rows (Batch.labels float (B, C)), not class indices
    notes: tuple[str, ...] = ()  # warnings for the run's header (a split not used, a delimiter that looks wrong)

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"


def load_splits(cfg: DataConfig):
    """Load the dataset named by `cfg.data` and return ({"train", "val"} datasets, DataInfo).

    Refuses (UserError) data that cannot train a classifier: no images, one class, a class without training images.
    """
    if cfg.streaming:
        return _stream_splits(cfg)
    source = load_source(cfg)
    check_task(cfg, source.multilabel)
    train_name, val_name = split_names(list(source.splits), cfg)
    notes = list(source.notes)
    train = source.splits[train_name]
    if len(train) and unlabelled(train, source.class_names, cfg.data, train_name, source.multilabel):
        raise UserError(
            f"--data {cfg.data}: the training split {train_name!r} has no labels (every label -1 or empty); train on "
            "a labelled split (--train-split)"
        )
    if val_name and unlabelled(source.splits[val_name], source.class_names, cfg.data, val_name, source.multilabel):
        if cfg.val_split:
            raise UserError(
                f"--data {cfg.data}: --val-split {val_name} has no labels (every label -1 or empty), so it cannot "
                "score a model; name a labelled split, or leave --val-split out to hold out a share of training"
            )
        notes.append(
            f"warning: split {val_name!r} has no labels (every label -1): it is not a validation split; "
            f"{cfg.val_fraction:g} of {train_name!r} is held out instead"
        )
        val_name = ""
    if val_name:
        val, val_desc = source.splits[val_name], f"split {val_name}"
    else:
        try:
            # Stratified, seeded hold-out: every class keeps its share in both splits, identically on every rank.
            train, val = hold_out(train, cfg.val_fraction, cfg.split_seed, stratify=not source.multilabel)
        except ValueError as e:
            raise UserError(
                f"--data {cfg.data}: cannot hold out --val-fraction {cfg.val_fraction} per class ({e}); "
                "add a validation split or more images"
            ) from e
        how = "at random" if source.multilabel else "stratified"
        val_desc = f"{cfg.val_fraction:g} of {train_name} held out, {how}, --split-seed {cfg.split_seed}"
    # On the split that trains, after any hold-out: a label only in the held-out rows would train with no positives.
    _check_classes(train, source.class_names, cfg.data, source.multilabel, held_out=not val_name)
    excluded, exclusion = (), ""
    if cfg.exclude:  # after the split: the other images keep theirs, with --exclude or without
        before = {"train": train, "val": val}
        after, excluded = exclude_files(before, cfg)
        train, val, exclusion = after["train"], after["val"], describe_exclusion(cfg, before, after)
        _check_classes(train, source.class_names, f"{cfg.data} --exclude {cfg.exclude}", source.multilabel)
    if len(val) == 0:
        raise UserError(f"--data {cfg.data}: the validation split {val_name!r} has no images")
    info = DataInfo(
        class_names=source.class_names,
        channels=source.channels or guess_channels(train),
        train_size=len(train),
        val_size=len(val),
        source=source.description,
        default_hflip=source.default_hflip,
        val_split=val_desc,
        skipped=source.skipped,
        multilabel=source.multilabel,
        excluded=excluded,
        exclusion=exclusion,
        notes=tuple(notes),
    )
    return {"train": train, "val": val}, info


def _stream_splits(cfg: DataConfig):
    """({"train": IterableDataset (all ranks' data), "val": Dataset}, DataInfo) for --streaming. An epoch is a sample
    count: the dataset info, Parquet footers, tar headers, or --train-samples."""
    import datasets

    source = stream_source(cfg)
    names = list(source.split_names)
    train_name, val_name = split_names(names, cfg)
    if not val_name:
        raise UserError(
            f"--data {cfg.data} --streaming: no validation split (splits: {', '.join(names)}); a stream has no "
            "hold-out: add val-*/validation-* shards (trainer data convert writes them) or name one with --val-split"
        )
    train = source.open(train_name)
    if train.features is None:
        raise UserError(f"--data {cfg.data}: the stream does not declare its columns; name them in dataset_info.json")
    image_col, label_col = detect_columns(train.features, cfg.image_column, cfg.label_column, cfg.data)
    label = train.features[label_col]
    if is_list_feature(label) or cfg.task == "multilabel":
        raise UserError(
            f"--data {cfg.data} --streaming: multi-label streams are not read yet; drop --streaming (the data is "
            "then copied into the datasets cache once)"
        )
    if not isinstance(label, datasets.ClassLabel):
        raise UserError(
            f"--data {cfg.data} --streaming: the label column {label_col!r} has no class names (not a ClassLabel); "
            "write the shards with `trainer data convert` (it stores them) or drop --streaming"
        )
    size = cfg.train_samples or source.count(train_name)
    if not size:
        raise UserError(
            f"--data {cfg.data} --streaming: the number of training samples is unknown; give --train-samples"
        )
    val = read_split(source, val_name, image_col, label_col, label.names)
    if len(val) == 0:
        raise UserError(f"--data {cfg.data}: the validation split {val_name!r} has no images")
    if len(label.names) < 2:
        raise UserError(f"--data {cfg.data}: only one class; classification needs two or more")
    info = DataInfo(
        class_names=list(label.names),
        channels=guess_channels(val),
        train_size=int(size),
        val_size=len(val),
        source=source.description,
        default_hflip=0.5,
        val_split=f"split {val_name}, read once into the datasets cache",
    )
    return {"train": standard_stream(train, image_col, label_col), "val": val}, info


def load_splits_in_turn(accelerator, cfg: DataConfig):
    """`load_splits` on every rank in turn: the job's main process first (it scans folders and fills the caches), then
    the first process of every other node (for caches on node-local disks), then the rest, which reuse the caches."""
    # Collective: both context managers hold barriers (wait_for_everyone) that every rank passes twice in all.
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        return load_splits(cfg)


def labels_of(dataset) -> np.ndarray:
    """The label column as one array. Read through Arrow: `np.asarray(dataset["label"])` goes row by row."""
    return dataset.with_format("arrow")["label"].to_numpy().astype(np.int64)


def label_counts(dataset, info: DataInfo) -> np.ndarray:
    """Images per class (multi-label: positives per class) of a map-style split, as int64."""
    if info.multilabel:
        return label_matrix(dataset).sum(axis=0, dtype=np.int64)
    return np.bincount(labels_of(dataset), minlength=len(info.class_names)).astype(np.int64)


def balanced_weights(dataset, info: DataInfo) -> np.ndarray:
    """Per sample, the inverse frequency of its class (multi-label: of its rarest label), for --balanced-sampler."""
    inverse = 1.0 / np.maximum(label_counts(dataset, info), 1)
    if info.multilabel:
        rarest = (label_matrix(dataset) * inverse[None, :]).max(axis=1)
        return np.where(rarest > 0, rarest, inverse.min())  # an image without labels: as the commonest label
    return inverse[labels_of(dataset)]


def hold_out(train, fraction: float, seed: int, stratify: bool = True):
    """The rows of datasets' `train.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed)`, in
    its order, with its own index generator; the labels are read as one Arrow column, where train_test_split reads
    them row by row (0.1 ms a row: 0.5 s for 5,000 images, every run on a folder). Returns (train, held out)."""
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    n_test = math.ceil(fraction * len(train))
    rng = np.random.default_rng(seed)
    if not stratify:  # multi-label rows have no single class to stratify by
        order = rng.permutation(len(train))
        return train.select(np.sort(order[n_test:])), train.select(np.sort(order[:n_test]))
    try:
        train_rows, test_rows = next(
            stratified_shuffle_split_generate_indices(labels_of(train), len(train) - n_test, n_test, rng=rng)
        )
    except ValueError as e:  # worded as train_test_split words it
        if str(e) == "Minimum class count error":
            raise ValueError("The least populated class in label column has only 1 member, which is too few") from e
        raise
    return train.select(train_rows), train.select(test_rows)


def unlabelled(split, class_names: list[str], where: str, name: str, multilabel: bool) -> bool:
    """Whether a split holds no labels at all (ClassLabel's -1 in every row; multi-label: no positive anywhere).
    Refuses, in one line, a label index outside the class names and a single-label split only partly labelled:
    a label is never read as an index it is not."""
    if multilabel:
        return len(split) > 0 and not label_matrix(split).any()
    labels = labels_of(split)
    outside = sorted({int(v) for v in labels[(labels < -1) | (labels >= len(class_names))]})
    if outside:
        raise UserError(
            f"--data {where}: split {name!r} has label(s) {', '.join(map(str, outside[:5]))} outside its "
            f"{len(class_names)} class names (0..{len(class_names) - 1}, or -1 for no label); fix the label column"
        )
    missing = int((labels == -1).sum())
    if 0 < missing < len(labels):
        raise UserError(
            f"--data {where}: split {name!r} has {missing} of {len(labels)} image(s) without a label (-1); remove "
            "them (dataset.filter(lambda r: r['label'] != -1)) or label them"
        )
    return len(labels) > 0 and missing == len(labels)


def _check_classes(train, class_names: list[str], where: str, multilabel: bool = False, held_out: bool = False) -> None:
    if len(train) == 0:
        raise UserError(f"--data {where}: no training images")
    if len(class_names) < 2 and not multilabel:
        raise UserError(f"--data {where}: only one class ({', '.join(class_names)}); classification needs two or more")
    if multilabel:
        counts = label_matrix(train).sum(axis=0)
    else:
        counts = np.bincount(labels_of(train), minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        after = (
            " once the validation share was held out (they are only in held-out images: add images of them, a "
            "validation split, or another --split-seed)"
            if held_out
            else ""
        )
        raise UserError(f"--data {where}: class(es) {', '.join(empty[:5])} have no training images{after}")


def guess_channels(train, sample: int = 16) -> int:
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
