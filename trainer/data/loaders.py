"""Loaders: samples -> backend -> torch DataLoader -> rank shard, as one `Loader` the loop iterates for `Batch`es.

Every loader of a run is made here, by one function per kind: `train_loader` (map-style data or a stream),
`eval_loader` (an unshuffled split: validation, `trainer val`, `trainer export`'s check) and `files_loader` (`trainer
predict`'s image files). Each wires the same pieces: samples (each augmented under its own seed, one replacement
policy), the backend's per-sample transform and collate in the workers, the DataLoader's worker settings, the rank
shard (data/shard.py), the backend's stage in the training process (DALI's decode) and, for training, mixup/cutmix
(data/mixing.py). The loop never knows which backend feeds it.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainer.config import DataConfig
from trainer.data import shard as sharding
from trainer.data.backends import Backend
from trainer.data.mixing import BatchMixing
from trainer.data.resolution import TrainSize
from trainer.data.samples import BalancedSampler, EpochStream, Indexed, Replacement, Replacing, SeededSamples
from trainer.data.sources.imagecheck import check_image
from trainer.data.transforms import Augment, Preprocess


@dataclass(frozen=True)
class Loader:
    """A sharded torch DataLoader and, for DALI, the stage that decodes its batches in this process; for training with
    --mixup/--cutmix, the mixing of each batch after it.

    `batches` is the prepared DataLoader (accelerate's, when there is an accelerator); `len()` counts this rank's
    batches."""

    batches: object
    stage: object = None  # dali.DaliStage, or None
    mixing: BatchMixing | None = None
    start: int = 0  # the number of the first batch yielded in the epoch (a resumed epoch skipped the others)
    size: TrainSize | None = None  # --progressive: the training size, set by set_epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        batches = iter(self.batches) if self.stage is None else self.stage.run(self.batches)
        return batches if self.mixing is None else self.mixing.run(batches, self.start)

    @property
    def num_workers(self) -> int:
        return self.batches.num_workers

    @property
    def dataset(self):
        return self.batches.dataset

    @property
    def imgsz(self) -> int | None:
        """The training size in force under --progressive (None: the size the loader was made for)."""
        return None if self.size is None else int(self.size)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle order and augmentation seeds of `epoch` (accelerate passes set_epoch on to the dataset only when it
        runs one process). An unsharded loader (no accelerator) reshuffles from its generator instead. Under
        --progressive also the epoch's image size, before any of its batches is drawn (workers read it per batch)."""
        if self.size is not None:
            self.size.set_epoch(epoch)
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)
        if hasattr(self.batches.dataset, "set_epoch"):
            self.batches.dataset.set_epoch(epoch)
        if self.mixing is not None:
            self.mixing.set_epoch(epoch)

    def skip(self, accelerator, num_batches: int) -> Loader:
        """This loader without its first `num_batches` (a resumed epoch): those are never read or decoded."""
        return replace(self, batches=accelerator.skip_first_batches(self.batches, num_batches), start=num_batches)


def _seed_worker(rank: int, worker_id: int) -> None:
    # Augmentation draws under each sample's own seed (samples.SeededSamples); anything else a worker draws differs
    # by rank, as torch seeds each worker from the loader's generator, which all ranks share.
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


def cpus_per_rank(local_processes: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, local_processes))


def num_workers(cfg: DataConfig, local_processes: int) -> int:
    """Workers per rank: the configured count, or the CPU share of this rank minus the training process."""
    if cfg.workers >= 0:
        return cfg.workers
    # With two cores or fewer per rank, a worker process only fights the training threads (measured: -20 %).
    share = cpus_per_rank(local_processes)
    return 0 if share <= 2 else min(8, share - 1)


def dali_threads(local_processes: int, workers: int) -> int:
    """DALI's CPU threads per rank: the cores the DataLoader workers (which only read bytes) leave."""
    return max(1, min(8, cpus_per_rank(local_processes) - workers))


def _worker_options(workers: int, device, rank: int) -> dict:
    """DataLoader settings every loader shares: persistent, prefetching workers set up by `_seed_worker`."""
    return dict(
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=partial(_seed_worker, rank) if workers > 0 else None,
    )


@dataclass(frozen=True)
class LoaderSpec:
    """What every loader of a run shares: the backend, the model's input geometry, worker count, seed."""

    backend: Backend
    pre: Preprocess
    workers: int
    seed: int = 0
    shuffle_buffer: int = 1000  # a stream's shuffle buffer (examples)


def train_loader(
    accelerator, split, spec: LoaderSpec, augment: Augment, batch_size: int, *, steps: int = 0, sample_weights=None
):
    """The training loader of this rank: `split` map-style (seeded shuffle, drop_last, sharded by batches) or a
    stream (this rank's part, `steps` batches per epoch). `batch_size` is per process. `sample_weights` (one per
    sample, --balanced-sampler): draw each epoch's samples in proportion to them instead of shuffling."""
    shard = sharding.Shard.of(accelerator)
    mixing = BatchMixing(augment.mixup, spec.seed) if augment.mixup is not None else None
    if not hasattr(split, "__len__"):  # a stream
        part = sharding.stream_part(split, shard, seed=spec.seed, buffer_size=spec.shuffle_buffer)
        workers = sharding.stream_workers(split, shard, spec.workers)
        epochs = EpochStream(part, spec.backend.examples(spec.pre, augment), batch_size, steps, spec.seed, shard.rank)
        loader = DataLoader(epochs, batch_size=None, **_worker_options(workers, shard.device, shard.rank))
        if accelerator is not None:  # what decides the order of the epochs: a resumed run repeats it with the same
            accelerator.print(
                f"stream: {steps * batch_size * shard.world} samples per epoch, {steps} batches of {batch_size} per "
                f"process, {shard.world} process(es), {workers} worker(s) per process, shuffle buffer "
                f"{spec.shuffle_buffer}"
            )
        return Loader(sharding.shard_loader(accelerator, loader, streamed=True), mixing=mixing, size=augment.size)
    examples = spec.backend.examples(spec.pre, augment)
    samples = SeededSamples(split, examples, spec.seed)
    dataset = Replacing(samples, Replacement(where=f"rank {shard.rank}"))
    generator = torch.Generator().manual_seed(spec.seed)  # same on every rank: the shuffle order must agree
    order = dict(shuffle=True, generator=generator)
    if sample_weights is not None:
        order = dict(sampler=BalancedSampler(sample_weights, spec.seed))
    # drop_last keeps every optimizer step at the full global batch (and BatchNorm away from tiny batches).
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=True,
        **order,
        collate_fn=spec.backend.collate(examples),
        **_worker_options(spec.workers, shard.device, shard.rank),
    )
    threads = dali_threads(shard.local_world, spec.workers)
    stage = spec.backend.stage(spec.pre, batch_size, threads, samples, augment)
    return Loader(
        sharding.shard_loader(accelerator, loader), stage and stage.on(_device(shard)), mixing, size=augment.size
    )


def eval_loader(accelerator, split, spec: LoaderSpec, batch_size: int) -> Loader:
    """An unshuffled loader of one map-style split with the evaluation transform, sharded by batches (the last
    padded; `gather_for_metrics` drops the padding)."""
    shard = sharding.Shard.of(accelerator)
    examples = spec.backend.examples(spec.pre)
    samples = Indexed(split.with_transform(examples))
    collate = spec.backend.collate(examples)
    loader = DataLoader(
        Replacing(samples, Replacement(where=f"rank {shard.rank}")),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        **_worker_options(spec.workers, shard.device, rank=0),
    )
    stage = spec.backend.stage(spec.pre, batch_size, dali_threads(shard.local_world, spec.workers), samples)
    return Loader(sharding.shard_loader(accelerator, loader), stage and stage.on(_device(shard)))


def files_loader(paths: list, spec: LoaderSpec, batch_size: int, device) -> tuple[Loader, dict[str, str]]:
    """`trainer predict`'s loader over image files, in one process, and {path: reason} of the files whose header does
    not read (checked up front, as a folder's files are). A file that fails later is not replaced but listed in its
    batch's `failed`. A batch's `labels` are its files' positions in `paths`."""
    import datasets

    checked = [(str(path), *check_image(str(path))) for path in paths]
    failed = {path: reason for path, mode, reason in checked if mode is None}
    readable = [n for n, (_, mode, _) in enumerate(checked) if mode is not None]
    files = datasets.Dataset.from_dict(
        {"image": [str(paths[n]) for n in readable], "label": readable},
        features=datasets.Features({"image": datasets.Value("string"), "label": datasets.Value("int64")}),
    )
    examples = spec.backend.examples(spec.pre, upright=True)
    samples = Replacing(Indexed(files.with_transform(examples)), Replacement(replace=False))
    collate = spec.backend.collate(examples)
    loader = DataLoader(
        samples,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=spec.workers,
    )
    stage = spec.backend.stage(spec.pre, batch_size, max(1, spec.workers), None, upright=True)
    return Loader(loader, stage and stage.on(device)), failed


def _device(shard: sharding.Shard):
    return shard.device if shard.device is not None else torch.device("cpu")
