"""The rank shard: the one module that decides which data each rank sees, for map-style data and streams alike.

- **Map-style data** (every built-in, folder, file and hub source): all ranks build the same loader over the whole
  split with the same seeded shuffle; `accelerator.prepare_data_loader` then hands each rank every N-th batch of it,
  and pads an unshuffled evaluation split so `gather_for_metrics` can drop the padding again.
- **A stream** (--streaming): `split_dataset_by_node` gives each rank its part (whole shards when their count divides
  by the world size, else every world-th example) under the same seed; the loader over that part is then placed on
  the rank's device by accelerate's `prepare_data_loader` for ONE process (device placement and end-of-epoch
  bookkeeping only): no dispatching of every batch from rank 0 (accelerate's default for an IterableDataset), no
  second split by its `IterableDatasetShard`. Equal step counts per rank come from samples.EpochStream.

The rank and world size come from the accelerator in both cases (`Shard.of`); without one (a single process, tests,
`trainer export`) nothing is split or moved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Who this process is among the ranks, and how many share its machine (for CPU shares)."""

    rank: int = 0
    world: int = 1
    local_world: int = 1
    device: object = None  # torch.device of the rank; None: no accelerator, nothing moved

    @classmethod
    def of(cls, accelerator=None) -> Shard:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if accelerator is None:
            return cls(local_world=local_world)
        return cls(accelerator.process_index, accelerator.num_processes, local_world, accelerator.device)


def stream_part(stream, shard: Shard, *, seed: int, buffer_size: int):
    """This rank's part of a stream, shuffled (shard order, then a buffer of examples) by the seed all ranks share."""
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(stream.shuffle(seed=seed, buffer_size=buffer_size), shard.rank, shard.world)


def stream_workers(stream, shard: Shard, workers: int) -> int:
    """Workers for this rank's part: datasets stops workers beyond the part's shard count (each reads whole shards)."""
    shards = stream.num_shards
    return min(workers, shards // shard.world if shards % shard.world == 0 else shards)


def shard_loader(accelerator, loader, *, streamed: bool = False):
    """The loader as this rank reads it (see the module docstring); unchanged without an accelerator."""
    if accelerator is None:
        return loader
    if not streamed:
        # No collective: every rank prepares the same loader and then iterates only its own batches.
        return accelerator.prepare_data_loader(loader)
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(
        loader,
        accelerator.device,
        num_processes=1,  # the data is already this rank's: only device placement and end-of-epoch tracking
        process_index=0,
        put_on_device=True,
        dispatch_batches=False,
        non_blocking=accelerator.device.type == "cuda",
    )
