"""Mixup and CutMix (--mixup/--cutmix) of the training batches, in the training process, the same at any process count.

timm's `Mixup` draws one lambda (and one CutMix box) per batch and pairs sample i with sample B-1-i. Run on each rank's
part of a global batch, that pairs other samples and draws other lambdas at every process count. `BatchMixing` runs
timm's `Mixup` on the batches a loader yields (after the backend: the torch path and DALI alike) with
- one draw per global micro-batch, under the seed of (--seed, epoch, its number in the epoch): rank r's n-th batch is
  its part of the epoch's n-th global micro-batch, so every rank draws the same lambda and box;
- each sample paired with its neighbour (0 with 1, 2 with 3, ...): a rank's part of the global batch starts at an even
  position and has an even size (`transforms.train_mixup` refuses an odd one), so no pair straddles two ranks.
The mixed global batch is then the same whether one process or eight make it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from trainer.data.batch import Batch
from trainer.data.samples import seed_of, seeded


def facing_neighbours(size: int, device=None) -> torch.Tensor:
    """An order of `size` (even) positions in which timm's pairing (i with size-1-i) pairs each even position with the
    next one: 0, 2, 4, ..., 5, 3, 1."""
    return torch.cat([torch.arange(0, size, 2), torch.arange(size - 1, 0, -2)]).to(device)


class BatchMixing:
    """timm's `Mixup` over this rank's training batches: one draw per global micro-batch, neighbours paired."""

    def __init__(self, mixup, seed: int):
        self.mixup, self.seed, self.epoch = mixup, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, batch: Batch, number: int) -> Batch:
        """`batch` (this rank's part of the epoch's `number`-th global micro-batch) mixed: images and class
        probabilities (or mixed multi-hot rows)."""
        order = facing_neighbours(len(batch), batch.images.device)
        key = seed_of(self.seed, "mix", self.epoch, number)
        # timm draws lambda, the choice of CutMix and its box from NumPy alone: the CPU seed decides them.
        images, labels = seeded(key, lambda: self.mixup(batch.images[order], batch.labels[order]))
        back = torch.argsort(order)
        return replace(batch, images=images[back], labels=labels[back])

    def run(self, batches, start: int = 0):
        """Every batch of `batches` mixed; `start`: the number of the first (a resumed epoch skipped the others)."""
        for number, batch in enumerate(batches, start):
            yield self(batch, number) if len(batch) else batch
