"""Samples: which examples make a batch, under which seed, and what takes the place of an unreadable image.

Two policies live here and nowhere else:
- **One seed per sample** (`sample_seed`): drawn from (--seed, epoch, the sample's identity: its index for map-style
  data, a digest of its bytes for a stream), never from a running generator nor from the batch it lands in. A sample
  then gets the same crop, flip, erasing and auto-augment draws whichever rank, worker or batch position loads it and
  whatever ran before: the same at any process count (docs/distributed.md), and a run resumed mid-epoch (first
  batches skipped, workers restarted) continues bitwise as if never stopped. `seeded` runs a function under a seed
  and restores every generator afterwards; `SeededSamples` reads a batch in one columnar read and augments each of
  its samples under that sample's seed.
- **One replacement for an unreadable image** (`Replacement`): a file that fails to decode mid-run (the up-front
  check catches the usual cases) is replaced by the next readable candidate, so a batch keeps its size and every rank
  its step count: for map-style data the sample NEIGHBOUR_STRIDE places on (wrapping), for a stream the next example.
  Each file is warned about once per process, in one wording, and 16 unreadable candidates in a row stop the run.
  `trainer predict` reports instead of replacing (`replace=False`): the file is listed with its reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import sys

import numpy as np
import torch

from trainer.data.batch import Failed
from trainer.data.decode import UnreadableImage

# An unreadable map-style sample is replaced by the one this many places on (wrapping): the same neighbour on every
# backend, so the torch and DALI paths stay interchangeable.
NEIGHBOUR_STRIDE = 7919
RETRIES = 16
# set_epoch(epoch * PASSES + p) reshuffles the p-th re-read of a rank's stream within one epoch.
PASSES = 1000


def seed_of(*key) -> int:
    """A seed from a key (seed, epoch, and what is drawn for): the same key gives the same seed in every process."""
    text = "/".join(",".join(map(str, k)) if isinstance(k, list | tuple) else str(k) for k in key)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def sample_seed(seed: int, epoch: int, sample) -> int:
    """The seed of one sample's augmentation in `epoch`; `sample`: its index (map-style) or `stream_key` (a stream)."""
    return seed_of(seed, epoch, sample)


def stream_key(image) -> str:
    """A streamed example's identity, the same whichever rank reads it: a digest of its encoded bytes (its path when
    the stream holds no bytes)."""
    data = image.get("bytes") if isinstance(image, dict) else image if isinstance(image, bytes) else None
    if data is None:
        return str(image.get("path") if isinstance(image, dict) else image)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@contextlib.contextmanager
def kept_generators(device: torch.device | None = None):
    """Python's, NumPy's and torch's CPU generator (and `device`'s, when it is a CUDA device) as they were before the
    block, whatever it drew or seeded: the training process's own draws (dropout, drop-path) stay untouched when
    batches load in-process (--workers 0) or augment on the device."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def reseed(seed: int, device: torch.device | None = None) -> None:
    """Seed every generator an augmentation draws from (inside `kept_generators`, which puts them back). Cheap enough
    per sample: the CPU generator is seeded directly (torch.manual_seed would also seed every CUDA device)."""
    torch.random.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def seeded(seed: int, fn, device: torch.device | None = None):
    """`fn()` with Python, NumPy and the CPU generator (and `device`'s, when it is a CUDA device) seeded by `seed`;
    every generator is restored afterwards (`kept_generators`)."""
    with kept_generators(device):
        reseed(seed, device)
        return fn()


class Replacement:
    """What takes the place of an unreadable image: the first readable of a sample's candidates.

    One per loader; `warned` holds the files already reported by this process."""

    def __init__(self, replace: bool = True, where: str = ""):
        self.replace, self.where, self.warned = replace, where, set()
        self.replaced = 0

    def warn(self, path: str, reason: str) -> None:
        self.replaced += 1
        if path not in self.warned:
            self.warned.add(path)
            place = f" on {self.where}" if self.where else ""
            print(
                f"trainer: warning: skipped unreadable image {path} ({reason}); {self.replaced} skipped{place} so far",
                file=sys.stderr,
                flush=True,
            )

    def first_readable(self, candidates, near: str):
        """The first of `candidates` (callables returning a sample, or raising UnreadableImage) that reads."""
        for attempt, fetch in enumerate(itertools.islice(candidates, RETRIES)):
            try:
                return fetch()
            except UnreadableImage as e:
                if not self.replace and attempt == 0:
                    return Failed(e.path, e.reason)
                self.warn(e.path, e.reason)
        raise RuntimeError(f"{RETRIES} images in a row near {near} are unreadable; check the dataset")

    def neighbours(self, dataset, index: int):
        """Candidates for map-style sample `index`: itself, then every NEIGHBOUR_STRIDE-th sample after it."""
        size = len(dataset)
        return (lambda i=(index + k * NEIGHBOUR_STRIDE) % size: dataset[i] for k in itertools.count())


class Indexed(torch.utils.data.Dataset):
    """Adds each example's dataset index (`index`), so a replacement can be fetched for it later (the DALI stage, for
    a file DALI rejects) or a result named by it (`trainer predict`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [{**row, "index": i} for row, i in zip(self.dataset.__getitems__(indices), indices, strict=True)]


class Replacing(torch.utils.data.Dataset):
    """A map-style dataset whose unreadable samples are replaced (or reported) by one `Replacement` policy."""

    def __init__(self, dataset, policy: Replacement | None = None):
        self.dataset, self.policy = dataset, policy or Replacement()

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the samples' seeds (`SeededSamples`), when they have one."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitems__(self, indices: list[int]) -> list:
        try:  # one columnar read for the whole batch, as HF datasets serve it
            return self.dataset.__getitems__(indices)
        except UnreadableImage:
            return [self[i] for i in indices]

    def __getitem__(self, index: int):
        return self.policy.first_readable(self.policy.neighbours(self.dataset, index), f"index {index}")


class SeededSamples(torch.utils.data.Dataset):
    """Map-style training samples, read a batch at a time (one columnar read, as HF datasets serve it) and each
    augmented by `transform` (an HF-style transform of a {column: values} batch) under its own seed: `sample_seed`
    of (--seed, epoch, its index). Each sample carries its `index`, so a replacement can be fetched for it later (the
    DALI stage, for a file DALI rejects)."""

    def __init__(self, split, transform, seed: int):
        # Plain Python rows, as `with_transform` hands its transform, whatever format the split was given.
        self.split = split.with_format(None) if hasattr(split, "with_format") else split
        self.transform, self.seed = transform, seed
        # Shared memory: persistent DataLoader workers see the epoch the main process sets.
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.split[list(indices)]  # {column: one value per index}
        epoch = int(self.epoch)
        samples = []
        with kept_generators():
            for j, index in enumerate(indices):
                reseed(sample_seed(self.seed, epoch, index))
                out = self.transform({column: [values[j]] for column, values in rows.items()})
                samples.append({**{column: values[0] for column, values in out.items()}, "index": index})
        return samples


class BalancedSampler(torch.utils.data.Sampler):
    """--balanced-sampler: each epoch `len(weights)` indices drawn with replacement, in proportion to `weights` (one
    per sample: inverse to its class frequency), under a generator seeded by (seed, epoch) alone. Every rank draws
    the same sequence and accelerate hands each its own batches (equal steps per rank, drop_last), and a resumed epoch
    draws it again and skips the batches already trained."""

    def __init__(self, weights, seed: int):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(seed_of(self.seed, "balanced", self.epoch))
        drawn = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator)
        return iter(drawn.tolist())


class EpochStream(torch.utils.data.IterableDataset):
    """Exactly `steps` batches per epoch from this rank's part of a stream, re-read (reshuffled) if it runs short.

    Batches are made here (DataLoader(batch_size=None)): worker w of W makes batches w, w+W, ..., which the
    DataLoader hands out in order, so the count is exact for any worker count. Each example is augmented under
    `sample_seed(seed, epoch, stream_key(image))`, whichever rank reads it; an unreadable example is replaced by the
    next one (`Replacement`).
    `transform` maps {"image": [...], "label": [...]} to examples and has a `collate`.
    """

    def __init__(self, stream, transform, batch_size: int, steps: int, seed: int, rank: int):
        self.stream, self.transform, self.batch_size, self.steps = stream, transform, batch_size, steps
        self.seed, self.rank = seed, rank
        self.policy = Replacement(where=f"rank {rank}")
        # Shared memory: persistent workers see the epoch the main process sets.
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        index, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch = int(self.epoch)
        rows = self._rows(epoch)  # inside a worker, datasets hands this worker its own shards
        for _ in range(index, self.steps, workers):
            with kept_generators():  # not around the yield: the consumer's own draws are no business of ours
                batch = self._batch(rows, epoch)
            yield batch

    def _rows(self, epoch: int):
        for n in itertools.count():
            self.stream.set_epoch(epoch * PASSES + n)
            read = 0
            for row in self.stream:
                read += 1
                yield row
            if not read:
                raise RuntimeError(f"rank {self.rank}: its part of the stream is empty; check the shards")

    def _example(self, row, epoch: int) -> dict:
        reseed(sample_seed(self.seed, epoch, stream_key(row["image"])))
        out = self.transform({"image": [row["image"]], "label": [row["label"]]})
        return {key: values[0] for key, values in out.items()}

    def _batch(self, rows, epoch: int):
        candidates = (lambda row=row: self._example(row, epoch) for row in rows)
        near = f"rank {self.rank}'s stream"
        examples = [self.policy.first_readable(candidates, near) for _ in range(self.batch_size)]
        return self.transform.collate(examples)
