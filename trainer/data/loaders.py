"""How batches reach a rank: seeded batches, skip-unreadable, and the torch DataLoaders.

A rank's shard is decided in one place: `accelerator.prepare` wraps these loaders so each rank takes every
N-th batch of one seeded shuffle (identical on all ranks); nothing here knows its rank except the augmentation seed.
Streamed data (--streaming) is split by rank in data/streaming.py instead, reached from `build_dataloaders`.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.config import DataConfig
from trainer.data import dali
from trainer.data.decode import NEIGHBOUR_STRIDE, UnreadableImage
from trainer.data.splits import DataInfo
from trainer.data.transforms import (
    ImageTransform,
    Preprocess,
    build_train_transform,
    resolve_hflip,
    resolve_scale,
    seeded,
)


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
                return self.dataset[(index + attempt * NEIGHBOUR_STRIDE) % len(self.dataset)]
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
        return seeded(self._batch_seed, lambda: fetch(indices) if fetch else [self.dataset[i] for i in indices])

    def collate(self, collate_fn, examples: list):
        """`collate_fn` under the seed of the batch just fetched (DataLoader collates right after fetching)."""
        return seeded(self._batch_seed + 1, lambda: collate_fn(examples))


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


def _cpus_per_rank(local_processes: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, local_processes))


def num_workers(cfg: DataConfig, local_processes: int) -> int:
    """Workers per rank: the configured count, or the CPU share of this rank minus the training process."""
    if cfg.workers >= 0:
        return cfg.workers
    cpus_per_rank = _cpus_per_rank(local_processes)
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
    loader: str = "torch",
) -> tuple:
    """Train and val loaders (not yet prepared: `prepare_loaders` shards them across ranks).

    `loader` "dali": the workers hand encoded bytes and crop windows to a DALI pipeline in the training process
    (trainer/data/dali.py); the shuffle, the per-batch seeds and the sharding are the torch path's."""
    if cfg.streaming:  # streamed data: every rank's part chosen and prepared in data/streaming.py, not by prepare()
        from trainer.data.streaming import build_stream_loaders

        return build_stream_loaders(
            splits,
            info,
            cfg,
            pre,
            per_device_batch_size,
            seed=seed,
            local_processes=local_processes,
            pin_memory=pin_memory,
        )
    train_tf = build_train_transform(cfg, info, pre, per_device_batch_size)
    workers = num_workers(cfg, local_processes)
    if loader == "dali":
        examples = dali.DaliExamples(pre, True, resolve_hflip(cfg, info), resolve_scale(cfg))
        indexed = dali.Indexed(splits["train"].with_transform(examples))
        train_ds, collate_fn = SeededBatches(SkipUnreadable(indexed), seed), dali.collate
    else:
        train_ds = SeededBatches(SkipUnreadable(splits["train"].with_transform(train_tf)), seed)
        collate_fn = train_tf.collate
    generator = torch.Generator().manual_seed(seed)  # same on every rank: the shuffle order must agree
    # drop_last keeps every optimizer step at the full global batch (and BatchNorm away from tiny batches).
    train = DataLoader(
        train_ds,
        batch_size=per_device_batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        collate_fn=partial(train_ds.collate, collate_fn),
        **_worker_options(workers, pin_memory, rank),
    )
    if loader == "dali":
        threads = dali.dali_threads(_cpus_per_rank(local_processes), workers)
        spec = dali.PipelineSpec(per_device_batch_size, pre, threads)
        train = dali.DaliLoader(train, spec, indexed, mixup=train_tf.mixup, random_erase=cfg.random_erase)
    val = build_eval_loader(
        splits["val"], pre, per_device_batch_size * 2, workers=workers, pin_memory=pin_memory, loader=loader
    )
    return train, val


def build_eval_loader(
    split, pre: Preprocess, per_device_batch_size: int, *, workers: int, pin_memory: bool, loader: str = "torch"
):
    """An unshuffled loader of one split with the evaluation transform (resize, centre crop, normalise)."""
    tf = dali.DaliExamples(pre, False) if loader == "dali" else ImageTransform(pre, False)
    dataset = SkipUnreadable(dali.Indexed(split.with_transform(tf)) if loader == "dali" else split.with_transform(tf))
    batches = DataLoader(
        dataset,
        batch_size=per_device_batch_size,
        shuffle=False,
        collate_fn=_seeded_collate if loader == "dali" else tf.collate,
        **_worker_options(workers, pin_memory, rank=0),
    )
    if loader != "dali":
        return batches
    threads = dali.dali_threads(_cpus_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", 1))), workers)
    return dali.DaliLoader(batches, dali.PipelineSpec(per_device_batch_size, pre, threads), dataset.dataset)


def _seeded_collate(examples: list) -> tuple:
    return seeded(0, lambda: dali.collate(examples))  # evaluation draws nothing: a fixed seed keeps it repeatable


def prepare_loaders(accelerator, *loaders):
    """`accelerator.prepare` for our loaders: a DALI loader's DataLoader is prepared (sharded), then rewrapped,
    since prepare rebuilds DataLoaders and drops wrappers and subclasses (accelerate#3322, #2975)."""
    prepared = []
    for loader in loaders:
        if isinstance(loader, dali.DaliLoader):
            prepared.append(loader.wrapping(accelerator.prepare(loader.loader), accelerator.device))
        else:
            prepared.append(accelerator.prepare(loader))
    return prepared[0] if len(prepared) == 1 else tuple(prepared)


def skip_first_batches(accelerator, loader, num_batches: int):
    """`accelerator.skip_first_batches` through a DALI wrapper: the batches skipped are never read or decoded."""
    if isinstance(loader, dali.DaliLoader):
        return loader.wrapping(accelerator.skip_first_batches(loader.loader, num_batches))
    return accelerator.skip_first_batches(loader, num_batches)


def _worker_options(workers: int, pin_memory: bool, rank: int) -> dict:
    """DataLoader settings every loader shares: persistent, prefetching workers set up by `_seed_worker`."""
    return dict(
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=partial(_seed_worker, rank) if workers > 0 else None,
    )
