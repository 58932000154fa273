"""The data side of a run: one pipeline, each step one module's job, imports running down it.

    source -> splits -> samples -> decode -> backend -> loader -> rank shard

- `sources/` (`load_source`: one small loader per kind of `--data` (built-in, class folder, labels.csv folder,
  save_to_disk, Parquet/Arrow files, WebDataset shards, hub id), then one standardisation after it; `stream_source`
  for --streaming, from the same pieces; the split names): where images come from, as `image` + `label` columns;
- `multilabel`: the one stored form of multi-label labels (a multi-hot row per image), read by sources and splits;
- `splits`: train/validation splits of either kind, the class checks, and what the run learns (`DataInfo`);
- `samples`: the seed of each sample's augmentation (`sample_seed`: seed, epoch, the sample; never its batch or
  rank), and what replaces an unreadable image (`Replacement`): one policy, one warning;
- `decode`: the one place an image's encoded bytes and header are read and where it is decoded;
- `transforms` (the augmentation in force, `Preprocess`, the torch backend's transform) and `dali` (the DALI
  backend), behind `backends` (`Backend`: per-sample work, collate, in-process stage; `choose_backend`);
- `mixing`: mixup/cutmix of the training batches in the training process, one draw per global batch
  (`BatchMixing`), so the same at any process count;
- `batch`: what loaders yield (`Batch`; `EncodedBatch` between DALI's halves);
- `resolution`: the training size of each epoch (--progressive, `SizeSchedule`), shared with the workers (`TrainSize`);
- `labels`: checks on the labels every source must pass (class names told apart in any Unicode spelling);
- `coverage`: every class of the train split still reaches the model (`ClassCoverage`: stop when one lost every
  image);
- `loaders`: every loader of a run (`train_loader`, `eval_loader`, `files_loader`) as a `Loader`;
- `shard`: which data each rank sees, for map-style data and streams alike;
- `fingerprint`: what a run trains on, in counts and digests (kept in checkpoints; `--resume` compares it);
- `convert`: `trainer data convert` (any source to WebDataset or Parquet shards).

The engine asks this package for two things: the data (`load_data`: splits + what the model needs to know) and the
loaders (`build_loaders`), already sharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from trainer.config import DataConfig
from trainer.data.backends import Backend, choose_backend
from trainer.data.batch import Batch
from trainer.data.coverage import ClassCoverage, present
from trainer.data.decode import UnreadableImage, decode_image
from trainer.data.labels import check_class_names
from trainer.data.loaders import Loader, LoaderSpec, eval_loader, files_loader, num_workers, train_loader
from trainer.data.resolution import SizeSchedule, TrainSize, size_schedule, size_step
from trainer.data.sources import BUILTIN
from trainer.data.splits import (
    DataInfo,
    balanced_weights,
    label_counts,
    load_splits,
    load_splits_in_turn,
    unreadable_warning,
)
from trainer.data.transforms import (
    ImageTransform,
    Preprocess,
    dataset_record,
    describe_augmentation,
    resolve_augment,
    resolve_preprocess,
)


@dataclass(frozen=True)
class Data:
    """A run's data: its splits (`train` map-style or a stream, `val` map-style) and what it learned of them."""

    splits: dict
    info: DataInfo

    @property
    def train(self):
        return self.splits["train"]

    @property
    def val(self):
        return self.splits["val"]


def load_data(accelerator, cfg: DataConfig) -> Data:
    """The data `cfg` names, loaded on every rank in turn (the main process fills the caches first)."""
    # Collective: the barriers of main_process_first/local_main_process_first inside; every rank calls it.
    loaded = Data(*load_splits_in_turn(accelerator, cfg))
    check_class_names(loaded.info.class_names, loaded.info.source)  # every source alike, every rank alike
    return loaded


def build_loaders(
    accelerator,
    data: Data,
    cfg: DataConfig,
    spec: LoaderSpec,
    per_device_batch_size: int,
    schedule: SizeSchedule | None = None,
):
    """(train, val) Loaders of this rank, already sharded: the training split shuffled and augmented (steps per epoch
    equal on every rank, streams included), at the size `schedule` gives each epoch (--progressive; else
    `spec.pre.imgsz`); validation unshuffled at twice the batch, at --test-imgsz (or --imgsz)."""
    world = accelerator.num_processes if accelerator is not None else 1
    size = TrainSize(schedule) if schedule is not None else None
    augment = resolve_augment(cfg, data.info, per_device_batch_size, size)
    steps = data.info.train_size // (world * per_device_batch_size)
    weights = balanced_weights(data.train, data.info) if cfg.balanced_sampler else None
    train = train_loader(
        accelerator, data.train, spec, augment, per_device_batch_size, steps=steps, sample_weights=weights
    )
    at_test_size = replace(spec, pre=replace(spec.pre, imgsz=cfg.eval_imgsz))
    val = eval_loader(accelerator, data.val, at_test_size, per_device_batch_size * 2)
    return train, val


def loader_spec(cfg: DataConfig, backend: Backend, pre: Preprocess, *, seed: int = 0) -> LoaderSpec:
    """What every loader of a run shares, from the data flags: backend, geometry, workers per rank, seed."""
    workers = num_workers(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return LoaderSpec(backend, pre, workers, seed, cfg.shuffle_buffer)


__all__ = [
    "BUILTIN",
    "Backend",
    "Batch",
    "ClassCoverage",
    "Data",
    "DataInfo",
    "ImageTransform",
    "Loader",
    "LoaderSpec",
    "Preprocess",
    "SizeSchedule",
    "UnreadableImage",
    "build_loaders",
    "choose_backend",
    "dataset_record",
    "decode_image",
    "describe_augmentation",
    "eval_loader",
    "files_loader",
    "label_counts",
    "load_data",
    "load_splits",
    "loader_spec",
    "num_workers",
    "present",
    "resolve_preprocess",
    "size_schedule",
    "size_step",
    "unreadable_warning",
]
