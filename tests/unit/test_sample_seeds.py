"""A sample's augmentation does not depend on where it lands: not on its batch, its position in it, the rank that
loads it, nor on what ran before; mixup/cutmix of a batch split over ranks equal mixing it whole. (The 2-process runs
that rest on this: tests/e2e/test_any_process_count.py.)"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer import data
from trainer.config import DataConfig
from trainer.data.batch import Batch
from trainer.data.mixing import BatchMixing
from trainer.data.samples import SeededSamples
from trainer.data.splits import DataInfo
from trainer.data.transforms import Preprocess, train_mixup


class _Rows:
    """A stand-in split served as HF datasets serves one: {column: values} for a list of indices."""

    def __len__(self):
        return 100

    def __getitem__(self, indices):
        return {"i": list(indices)}


def _draw(batch: dict) -> dict:
    """A transform drawing from every generator an augmentation may use."""
    return {**batch, "draws": [(random.random(), np.random.rand(), torch.rand(()).item()) for _ in batch["i"]]}


def test_a_samples_draws_do_not_depend_on_its_batch_or_what_ran_before():
    ds = SeededSamples(_Rows(), _draw, seed=1)
    ds.set_epoch(1)
    first = ds.__getitems__([3, 7])
    torch.rand(10), random.random()  # other consumers of the global generators
    outer = torch.get_rng_state()
    assert ds.__getitems__([7, 5, 3]) == [first[1], ds[5], first[0]]  # another batch, another position
    assert [s["index"] for s in first] == [3, 7]
    assert torch.equal(torch.get_rng_state(), outer)  # the training process's generators are untouched
    assert first[0]["draws"] != first[1]["draws"]  # samples draw apart
    ds.set_epoch(2)
    assert ds.__getitems__([3, 7]) != first
    assert SeededSamples(_Rows(), _draw, seed=2).__getitems__([3, 7]) != first


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_batch_split_in_two_holds_the_whole_batchs_pixels(backend):
    """Two ranks of a global batch of 8 load positions 0-3 and 4-7 of it: the same pixels, bit for bit, as one
    process loading all 8 (flips, crops and random erasing on; DALI decodes and erases on the CPU)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = DataConfig(data="digits", imgsz=16, workers=0, hflip=0.5, scale=(0.3, 1.0), random_erase=0.5)
    pre = Preprocess(16, 1, (0.5,), (0.25,), "bilinear", 1.0)
    dataset = data.Data(*data.load_splits(cfg))
    spec = data.loader_spec(cfg, data.Backend(backend, "test"), pre, seed=5)
    whole, _ = data.build_loaders(None, dataset, cfg, spec, 8)
    halves, _ = data.build_loaders(None, dataset, cfg, spec, 4)
    for loader in (whole, halves):
        loader.set_epoch(2)
    big, small = iter(whole), iter(halves)
    for _ in range(4):
        batch, first, second = next(big), next(small), next(small)
        assert torch.equal(batch.indices, torch.cat([first.indices, second.indices]))
        assert torch.equal(batch.labels, torch.cat([first.labels, second.labels]))
        assert torch.equal(batch.images, torch.cat([first.images, second.images]))


def test_mixing_a_batch_in_parts_equals_mixing_it_whole():
    info = DataInfo([str(c) for c in range(5)], 1, train_size=100, val_size=10, source="test", default_hflip=0.0)
    mixing = BatchMixing(train_mixup(DataConfig(mixup=0.4, cutmix=1.0), info, 4), seed=3)
    mixing.set_epoch(1)
    images, labels = torch.rand(8, 1, 16, 16), torch.arange(8) % 5
    draws = set()
    for number in range(8):
        whole = mixing(Batch(images, labels), number)
        parts = [mixing(Batch(images[at : at + 4], labels[at : at + 4]), number) for at in (0, 4)]
        assert torch.equal(whole.images, torch.cat([p.images for p in parts]))
        assert torch.equal(whole.labels, torch.cat([p.labels for p in parts]))
        lam = whole.labels[0, labels[0]].item()  # neighbours are paired: sample 0 with sample 1
        assert torch.allclose(whole.labels[0], lam * torch.eye(5)[labels[0]] + (1 - lam) * torch.eye(5)[labels[1]])
        draws.add(round(lam, 6))
    assert len(draws) > 4  # one draw per global batch, not one for all
