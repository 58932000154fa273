"""Run under torchrun: each rank prints (as JSON) the dataset indices its DALI train loader decodes in one epoch,
its step count, and whether the decoded batches carry the labels of those indices."""

from __future__ import annotations

import json

import torch

from trainer import data
from trainer.config import Config, DataConfig
from trainer.data.transforms import Preprocess
from trainer.train.launch import build_accelerator

cfg = DataConfig(data="digits", imgsz=16, workers=0, loader="dali")
accelerator = build_accelerator(Config(data=cfg))
dataset = data.Data(*data.load_splits(cfg))
pre = Preprocess(16, 1, (0.5,), (0.25,), "bilinear", 1.0)
spec = data.loader_spec(cfg, data.Backend("dali", "test"), pre)
train, val = data.build_loaders(accelerator, dataset, cfg, spec, 32)  # sharded
train.set_epoch(1)
indices, labels = [], []
for batch in train.batches:  # the sharded DataLoader the DALI stage iterates: EncodedBatches
    indices += batch.indices.tolist()
    labels.append(batch.labels)
train.set_epoch(1)  # the same shuffle again (each pass of a prepared loader advances its epoch)
decoded = list(train)
same = all(torch.equal(y, x.labels) for y, x in zip(labels, decoded, strict=True))
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
