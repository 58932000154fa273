"""Datasets -> splits -> transforms -> DataLoaders. Sources (folders, files, hub ids) are loaded in sources.py.

Decoding and augmentation sit behind one seam, `ImageTransform` (transforms.py, re-exported here): it turns stored
examples into normalised tensors and, in `collate`, mixes batches (mixup/cutmix). Moving the pipeline to the GPU
later means replacing that class, not the training loop.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.config import DataConfig, UserError
from trainer.imagefolder import GRAY_MODES
from trainer.sources import BUILTIN, TRAIN_SPLITS, VAL_SPLITS, load_source
from trainer.transforms import (
    ImageTransform,
    UnreadableImage,
    build_train_transform,
    decode_image,
    resolve_hflip,
    resolve_scale,
)

__all__ = [
    "BUILTIN",
    "DataInfo",
    "ImageTransform",
    "Preprocess",
    "build_dataloaders",
    "decode_image",
    "load_splits",
    "resolve_hflip",
]


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


@dataclass(frozen=True)
class Preprocess:
    """Input geometry and normalisation; stored in the weights' metadata so inference can repeat it."""

    imgsz: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


def load_splits(cfg: DataConfig):
    """Load the dataset named by `cfg.data` and return ({"train", "val"} datasets, DataInfo).

    Refuses (UserError) data that cannot train a classifier: no images, one class, a class without training images.
    """
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


def resolve_preprocess(cfg: DataConfig, model, in_chans: int) -> Preprocess:
    """Normalisation, interpolation and crop from the model's pretrained config, at our image size."""
    from timm.data import resolve_data_config

    timm_cfg = resolve_data_config(model=model)
    mean, std = tuple(timm_cfg["mean"]), tuple(timm_cfg["std"])
    if in_chans != len(mean):
        # One-channel models see the average of the RGB statistics (what timm's adapted first conv implies).
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Preprocess(cfg.imgsz, in_chans, mean, std, timm_cfg["interpolation"], float(timm_cfg["crop_pct"]))


def dataset_record(cfg: DataConfig, info: DataInfo, pre: Preprocess) -> dict:
    """The dataset facts written to config.yaml and the trackers."""
    return {
        "source": info.source,
        "train_size": info.train_size,
        "val_size": info.val_size,
        "val_split": info.val_split,
        "num_classes": len(info.class_names),
        "class_names": info.class_names,
        "in_chans": pre.in_chans,
        "hflip": resolve_hflip(cfg, info),
        "scale": list(resolve_scale(cfg)),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "skipped_files": len(info.skipped),
    }


class SkipUnreadable(Dataset):
    """Serves a neighbour in place of an image that fails to decode mid-run (the up-front check catches the usual
    cases), so a batch keeps its size and every rank its step count."""

    def __init__(self, dataset, retries: int = 16):
        self.dataset, self.retries, self.warned = dataset, retries, set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        try:  # one columnar read for the whole batch, as HF datasets serve it
            return self.dataset.__getitems__(indices)
        except UnreadableImage:
            return [self[i] for i in indices]

    def __getitem__(self, index: int) -> dict:
        for attempt in range(self.retries):
            try:
                return self.dataset[(index + attempt * 7919) % len(self.dataset)]
            except UnreadableImage as e:
                if e.path not in self.warned:
                    self.warned.add(e.path)
                    print(f"trainer: warning: skipped unreadable image {e}", file=sys.stderr, flush=True)
        raise RuntimeError(f"{self.retries} images in a row near index {index} are unreadable; check the dataset")


class SeededBatches(torch.utils.data.Dataset):
    """Seeds the augmentation of every batch from (seed, epoch, the batch's indices), not from a running stream.

    The same batch then gets the same crops, and through `collate` the same mixup/cutmix draws, whichever process or
    worker loads it and whatever ran before it, so a run resumed mid-epoch (its first batches skipped, workers
    restarted) continues bitwise as if never stopped.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._batch_seed = 0  # the seed of the batch this process fetched last; its collate runs next
        # Shared memory: persistent DataLoader workers see the epoch the main process sets.
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        key = f"{self.seed}/{int(self.epoch)}/{','.join(map(str, indices))}".encode()
        self._batch_seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        fetch = getattr(self.dataset, "__getitems__", None)
        return _seeded(self._batch_seed, lambda: fetch(indices) if fetch else [self.dataset[i] for i in indices])

    def collate(self, collate_fn, examples: list):
        """`collate_fn` under the seed of the batch just fetched (DataLoader collates right after fetching)."""
        return _seeded(self._batch_seed + 1, lambda: collate_fn(examples))


def _seeded(seed: int, fn):
    py_state, np_state = random.getstate(), np.random.get_state()
    # fork_rng restores the CPU generator afterwards: the training process's own stream (dropout, drop-path)
    # stays untouched when batches load in-process (--workers 0).
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # CPU only: leave the CUDA generators alone
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return fn()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def set_epoch(loader, epoch: int) -> None:
    """Shuffle order and augmentation seeds of `epoch` (accelerate passes set_epoch on to the dataset only when it
    runs one process)."""
    loader.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def _seed_worker(rank: int, worker_id: int) -> None:
    # torch seeds each worker from the loader's generator, which is shared by all ranks (it also drives the
    # shuffle, which must agree across ranks); offset by rank so ranks draw different augmentations.
    seed = (torch.initial_seed() + rank * 1_000_003) % 2**63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # Ctrl-C and `kill -TERM` of a process group reach the workers too; the training process handles them
    # (finish the step, checkpoint, shut its workers down), and a worker dying first would abort that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # One worker is one core's worth of work, as torch makes it for itself (one intra-op thread in a worker);
    # Arrow's thread pools would otherwise start a thread per core in every worker.
    import pyarrow

    pyarrow.set_cpu_count(1)
    pyarrow.set_io_thread_count(1)


def num_workers(cfg: DataConfig, local_processes: int) -> int:
    """Workers per rank: the configured count, or the CPU share of this rank minus the training process."""
    if cfg.workers >= 0:
        return cfg.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus_per_rank = cpus // max(1, local_processes)
    # With two cores or fewer per rank, a worker process only fights the training threads (measured: -20 %).
    return 0 if cpus_per_rank <= 2 else min(8, cpus_per_rank - 1)


def build_dataloaders(
    splits: dict,
    info: DataInfo,
    cfg: DataConfig,
    pre: Preprocess,
    per_device_batch_size: int,
    *,
    seed: int,
    rank: int,
    local_processes: int,
    pin_memory: bool,
) -> tuple[DataLoader, DataLoader]:
    """Train and val DataLoaders (not yet prepared: `accelerator.prepare` shards them across ranks)."""
    train_tf = build_train_transform(cfg, info, pre, per_device_batch_size)
    train_ds = SeededBatches(SkipUnreadable(splits["train"].with_transform(train_tf)), seed)
    workers = num_workers(cfg, local_processes)
    generator = torch.Generator().manual_seed(seed)  # same on every rank: the shuffle order must agree
    # drop_last keeps every optimizer step at the full global batch (and BatchNorm away from tiny batches).
    train = DataLoader(
        train_ds,
        batch_size=per_device_batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        collate_fn=partial(train_ds.collate, train_tf.collate),
        **_worker_options(workers, pin_memory, rank),
    )
    val = build_eval_loader(splits["val"], pre, per_device_batch_size * 2, workers=workers, pin_memory=pin_memory)
    return train, val


def build_eval_loader(split, pre: Preprocess, per_device_batch_size: int, *, workers: int, pin_memory: bool):
    """An unshuffled loader of one split with the evaluation transform (resize, centre crop, normalise)."""
    tf = ImageTransform(pre, False)
    return DataLoader(
        SkipUnreadable(split.with_transform(tf)),
        batch_size=per_device_batch_size,
        shuffle=False,
        collate_fn=tf.collate,
        **_worker_options(workers, pin_memory, rank=0),
    )


def _worker_options(workers: int, pin_memory: bool, rank: int) -> dict:
    """DataLoader settings every loader shares: persistent, prefetching workers set up by `_seed_worker`."""
    return dict(
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=partial(_seed_worker, rank) if workers > 0 else None,
    )
