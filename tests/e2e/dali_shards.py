"""Run under torchrun: each rank prints (as JSON) the dataset indices its DALI train loader decodes in one epoch,
its step count, and whether the decoded batches carry the labels of those indices."""

from __future__ import annotations

import json

import torch

from trainer import data
from trainer.config import Config, DataConfig
from trainer.data.transforms import Preprocess
from trainer.launch import build_accelerator

cfg = DataConfig(data="digits", imgsz=16, workers=0, loader="dali")
accelerator = build_accelerator(Config(data=cfg))
splits, info = data.load_splits(cfg)
pre = Preprocess(16, 1, (0.5,), (0.25,), "bilinear", 1.0)
train, val = data.build_dataloaders(
    splits,
    info,
    cfg,
    pre,
    32,
    seed=0,
    rank=accelerator.process_index,
    local_processes=2,
    pin_memory=False,
    loader="dali",
)
train, val = data.prepare_loaders(accelerator, train, val)
data.set_epoch(train, 1)
indices, labels = [], []
for batch in train.loader:  # the prepared (sharded) DataLoader the DALI stage iterates
    indices += batch[4].tolist()
    labels.append(batch[3])
data.set_epoch(train, 1)  # the same shuffle again (each pass of a prepared loader advances its epoch)
decoded = list(train)
same = all(torch.equal(y, x[1]) for y, x in zip(labels, decoded, strict=True))
print(
    "SHARD "
    + json.dumps(
        {
            "rank": accelerator.process_index,
            "world": accelerator.num_processes,
            "steps": len(decoded),
            "indices": indices,
            "labels_match": same,
        }
    ),
    flush=True,
)
