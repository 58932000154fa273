"""Every class of the train split reaches the model: a class whose every image became unreadable after the scan (its
files deleted, truncated or made unreadable in place, which keeps the scan cache valid) would otherwise train on
substitutes only, with a warning per file and no error.

The loop counts, per class, the samples each batch holds (`present`; summed over ranks at the epoch's end, in the
reduce it already makes). A class with images that no batch of a whole epoch held is then read directly, a few of its
files (`ClassCoverage.check`): if none decodes, the run stops with one line; if one does, the epoch merely drew none
of them (--balanced-sampler draws with replacement, drop_last leaves a few out) and training goes on. Every rank
checks the same summed counts and reads the same files, so all stop together."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from trainer.config import UserError
from trainer.data.decode import UnreadableImage, decode_image
from trainer.data.splits import labels_of

TRIES = 16  # files of an unseen class read before it is declared lost


def present(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Samples per class in a batch: class indices counted, or rows whose mixed/smoothed target gives the class more
    than the row's floor (the label-smoothing share every class gets), as float on the labels' device."""
    if labels.dim() == 1:
        return torch.bincount(labels, minlength=num_classes).float()
    return ((labels - labels.amin(dim=1, keepdim=True)) > 1e-4).sum(dim=0).float()


class ClassCoverage:
    """The check of classes a whole epoch did not see. Reads nothing until one is unseen (start-up costs nothing)."""

    def __init__(self, split, class_names: list[str]):
        self.split, self.class_names = split, list(class_names)

    @cached_property
    def labels(self) -> np.ndarray:
        return labels_of(self.split)

    @property
    def counts(self) -> np.ndarray:
        """Images per class of the train split."""
        return np.bincount(self.labels, minlength=len(self.class_names))

    def check(self, seen, epoch: int, run_dir) -> None:
        """Raise UserError when a class that has images was absent from every batch of `epoch` and none of its first
        TRIES files decodes. `seen`: samples per class over all ranks."""
        unseen = np.flatnonzero(np.asarray(seen) == 0)
        if not len(unseen):
            return
        counts = self.counts
        for c in unseen[counts[unseen] > 0]:
            reasons = self._unreadable(np.flatnonzero(self.labels == c)[:TRIES])
            if reasons is not None:
                path, why = reasons[0]
                raise UserError(
                    f"every image of class {self.class_names[c]} is unreadable now: epoch {epoch} trained on none of "
                    f"its {counts[c]} images, and the first {len(reasons)} fail to read (e.g. {path}: {why}); "
                    "the epoch's weights are not saved: make the files readable again, then continue with "
                    f"trainer train --resume {run_dir}"
                )

    def _unreadable(self, indices) -> list[tuple[str, str]] | None:
        """(path, reason) of the images at `indices`, or None as soon as one of them decodes."""
        reasons = []
        raw = self.split.with_format(None)
        for i in indices:
            try:
                decode_image(raw[int(i)]["image"])
                return None
            except UnreadableImage as e:
                reasons.append((e.path, e.reason))
        return reasons
