"""Streamed training data (--streaming): an epoch is a sample count, and every rank runs exactly its share of it.

- The training split is a `datasets.IterableDataset` (a hub id, Parquet or WebDataset shards), never materialised:
  shuffled by `shuffle(seed, buffer_size)` (the shard order, then a buffer of examples), reseeded by `set_epoch`.
- The epoch has N samples (dataset info, Parquet footers, tar headers, or --train-samples), and every rank runs
  exactly floor(N / (world x per-device batch)) batches: a rank whose part of the stream runs short reads it again
  (reshuffled), one with more leaves the rest for later epochs. Equal step counts are what DDP needs: accelerate's
  own split of a stream gave 10 and 5 batches to two ranks over 3 shards, and the longer rank hung.
- A rank's part is decided in ONE place: `split_dataset_by_node` in `build_stream_loaders` (whole shards per rank
  when their count divides by the world size, else every world-th example). The train loader reaches
  `accelerator.prepare` already prepared for a single process (`prepare_data_loader(num_processes=1)`: device
  placement and end-of-epoch bookkeeping only) and marked `_is_accelerate_prepared`, so prepare leaves it as it is:
  no dispatching of every batch from rank 0 (accelerate's default for an IterableDataset), no second split by its
  `IterableDatasetShard`.
- Validation is read once into the datasets cache (`Dataset.from_generator` over the streamed split, main process
  first) and served as a map-style split: `accelerator.prepare` splits it and `gather_for_metrics` drops the padding,
  so every sample counts exactly once at any world size, as for every other source. Validation splits are small;
  a rank-split stream would need its own padding and masks to get the same guarantee.
- Resume: an epoch's batches are a function of (--seed, epoch, process count, worker count), augmentation included
  (seeded per batch), so resuming is exact at epoch boundaries, and mid-epoch too: `skip_first_batches` reads and
  drops the batches already trained (same process and worker counts; it costs the time to read them).
- An unreadable image inside a shard is skipped and counted (a warning per image); its batch takes the next example.
"""

from __future__ import annotations

import hashlib
import itertools
import sys

import torch
from torch.utils.data import DataLoader

from trainer.config import DataConfig, UserError
from trainer.data.decode import UnreadableImage
from trainer.data.loaders import _worker_options, build_eval_loader, num_workers
from trainer.data.sources import TRAIN_SPLITS, VAL_SPLITS, StreamSource, detect_columns, stream_source
from trainer.data.splits import DataInfo, _guess_channels
from trainer.data.transforms import Preprocess, build_train_transform, seeded

# set_epoch(epoch * PASSES + p) reshuffles the p-th re-read of a rank's stream within one epoch.
PASSES = 1000


def load_stream_splits(cfg: DataConfig):
    """({"train": IterableDataset (all ranks' data), "val": Dataset}, DataInfo) for --streaming."""
    import datasets

    source = stream_source(cfg)
    names = source.split_names
    train_name = cfg.train_split or next((n for n in TRAIN_SPLITS if n in names), names[0])
    val_name = cfg.val_split or next((n for n in VAL_SPLITS if n in names and n != train_name), "")
    for flag, name in (("--train-split", train_name), ("--val-split", val_name)):
        if name and name not in names:
            raise UserError(f"--data {cfg.data}: {flag} {name!r} is not a split; splits: {', '.join(names)}")
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
    val = _read_split(source, val_name, image_col, label_col, label.names)
    if len(val) == 0:
        raise UserError(f"--data {cfg.data}: the validation split {val_name!r} has no images")
    if len(label.names) < 2:
        raise UserError(f"--data {cfg.data}: only one class; classification needs two or more")
    info = DataInfo(
        class_names=list(label.names),
        channels=_guess_channels(val),
        train_size=int(size),
        val_size=len(val),
        source=source.description,
        default_hflip=0.5,
        val_split=f"split {val_name}, read once into the datasets cache",
    )
    return {"train": _standard(train, image_col, label_col), "val": val}, info


def _standard(stream, image_col: str, label_col: str):
    """Columns `image` (undecoded: decoding belongs to ImageTransform) and `label`, as every other source has."""
    import datasets

    stream = stream.select_columns([image_col, label_col]).cast_column(image_col, datasets.Image(decode=False))
    if image_col != "image":
        stream = stream.rename_column(image_col, "image")
    return stream.rename_column(label_col, "label") if label_col != "label" else stream


def _read_split(source: StreamSource, split: str, image_col: str, label_col: str, names: list[str]):
    """The streamed split, written once into the datasets cache; keyed on the files' sizes and times (local data)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)})
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.Dataset.from_generator(
            _split_rows,
            features=features,
            gen_kwargs={
                "source": source,
                "split": split,
                "columns": (image_col, label_col),
                # A string, not a list: from_generator would read a list as shards and call _split_rows per item.
                "stamp": repr(source.files.stamp() if source.files else []),
            },
        )
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _split_rows(source: StreamSource, split: str, columns: tuple[str, str], stamp: str):
    yield from _standard(source.open(split), *columns)


class EpochStream(torch.utils.data.IterableDataset):
    """Exactly `steps` batches per epoch from this rank's stream, re-read (reshuffled) if it runs short.

    Batches are made here (DataLoader(batch_size=None)): worker w of W makes batches w, w+W, ..., which the
    DataLoader hands out in order, so the count is exact for any worker count. Each batch's augmentation (and
    mixup) is seeded from (seed, epoch, rank, batch index), like `SeededBatches` does for map-style data.
    """

    def __init__(self, stream, transform, batch_size: int, steps: int, seed: int, rank: int):
        self.stream, self.transform, self.batch_size, self.steps = stream, transform, batch_size, steps
        self.seed, self.rank = seed, rank
        # Shared memory: persistent workers see the epoch the main process sets, and add to one skip count.
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.skipped = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        index, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch = int(self.epoch)
        rows = self._rows(epoch)  # inside a worker, datasets hands this worker its own shards
        for batch in range(index, self.steps, workers):
            key = f"{self.seed}/{epoch}/{self.rank}/{batch}".encode()
            seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
            yield seeded(seed, lambda: self._batch(rows))

    def _rows(self, epoch: int):
        for n in itertools.count():
            self.stream.set_epoch(epoch * PASSES + n)
            read = 0
            for row in self.stream:
                read += 1
                yield row
            if not read:
                raise RuntimeError(f"rank {self.rank}: its part of the stream is empty; check the shards")

    def _batch(self, rows):
        examples = []
        while len(examples) < self.batch_size:
            row = next(rows)
            try:
                out = self.transform({"image": [row["image"]], "label": [row["label"]]})
            except UnreadableImage as e:
                self.skipped += 1
                print(
                    f"trainer: warning: skipped unreadable image {e}; {int(self.skipped)} skipped on rank {self.rank} "
                    "so far",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            examples.append({"image": out["image"][0], "label": out["label"][0]})
        return self.transform.collate(examples)


def build_stream_loaders(
    splits: dict,
    info: DataInfo,
    cfg: DataConfig,
    pre: Preprocess,
    per_device_batch_size: int,
    *,
    seed: int,
    local_processes: int,
    pin_memory: bool,
):
    """Train loader over this rank's part of the stream (already prepared: see the module docstring), val loader."""
    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader
    from datasets.distributed import split_dataset_by_node

    state = PartialState()
    world, rank = state.num_processes, state.process_index
    shards = splits["train"].num_shards
    # The one place a rank's part is chosen. The same seed on every rank: the same shard order to split.
    stream = split_dataset_by_node(splits["train"].shuffle(seed=seed, buffer_size=cfg.shuffle_buffer), rank, world)
    # datasets stops workers beyond this rank's shard count: give it no more (each worker reads whole shards).
    workers = min(num_workers(cfg, local_processes), shards // world if shards % world == 0 else shards)
    steps = info.train_size // (world * per_device_batch_size)
    train_tf = build_train_transform(cfg, info, pre, per_device_batch_size)
    epochs = EpochStream(stream, train_tf, per_device_batch_size, steps, seed, rank)
    loader = DataLoader(epochs, batch_size=None, **_worker_options(workers, pin_memory, rank))
    train = prepare_data_loader(
        loader,
        state.device,
        num_processes=1,  # the data is already this rank's: only device placement and end-of-epoch tracking
        process_index=0,
        put_on_device=True,
        dispatch_batches=False,
        non_blocking=pin_memory,
    )
    # What decides the order of the epochs: a resumed run repeats it exactly with the same counts.
    state.print(
        f"stream: {info.train_size} samples per epoch, {steps} batches of {per_device_batch_size} per process, "
        f"{world} process(es), {workers} worker(s) per process, shuffle buffer {cfg.shuffle_buffer}"
    )
    # accelerate's own mark for "prepared already": accelerator.prepare then keeps this loader as it is.
    train._is_accelerate_prepared = True
    workers = num_workers(cfg, local_processes)
    val = build_eval_loader(splits["val"], pre, per_device_batch_size * 2, workers=workers, pin_memory=pin_memory)
    return train, val
