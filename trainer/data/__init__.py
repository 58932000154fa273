"""The data side of a run. Each module owns one question:

- `sources`: where images come from (built-in sets, folders, save_to_disk folders, Parquet/Arrow, hub ids);
- `folders`: how an image folder is scanned and its files checked up front;
- `splits`: train/validation splits, the class checks, and what the run learns about the data (`DataInfo`);
- `decode`: how a stored image is decoded (PIL) - the one place an image becomes pixels on the torch path;
- `transforms`: how a decoded image is augmented and normalised (`ImageTransform`, `Preprocess`);
- `dali`: the second input path (`--loader dali`): workers hand encoded bytes and crop windows to a DALI pipeline;
- `loaders`: how batches reach a rank (seeded batches, DataLoaders; `accelerator.prepare` decides each rank's shard);
- `streaming`: --streaming: a stream split by rank, the same step count on every rank (reached from `splits` and
  `loaders` by a lazy import);
- `convert`: `trainer data convert`: any source to WebDataset or Parquet shards.

Imports flow one way: loaders -> dali -> transforms -> splits -> sources -> folders -> decode.
"""

from trainer.data.dali import LoaderChoice, choose_loader
from trainer.data.decode import UnreadableImage, decode_image
from trainer.data.loaders import (
    SeededBatches,
    SkipUnreadable,
    build_dataloaders,
    build_eval_loader,
    num_workers,
    prepare_loaders,
    set_epoch,
    skip_first_batches,
)
from trainer.data.sources import BUILTIN
from trainer.data.splits import DataInfo, load_splits, load_splits_in_turn, unreadable_warning
from trainer.data.transforms import (
    ImageTransform,
    Preprocess,
    build_train_transform,
    dataset_record,
    describe_augmentation,
    resolve_hflip,
    resolve_preprocess,
    resolve_scale,
)

__all__ = [
    "BUILTIN",
    "DataInfo",
    "ImageTransform",
    "LoaderChoice",
    "Preprocess",
    "SeededBatches",
    "SkipUnreadable",
    "UnreadableImage",
    "build_dataloaders",
    "build_eval_loader",
    "build_train_transform",
    "choose_loader",
    "dataset_record",
    "decode_image",
    "describe_augmentation",
    "load_splits",
    "load_splits_in_turn",
    "num_workers",
    "prepare_loaders",
    "resolve_hflip",
    "resolve_preprocess",
    "resolve_scale",
    "set_epoch",
    "skip_first_batches",
    "unreadable_warning",
]
