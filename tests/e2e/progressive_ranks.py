"""Run under torchrun: each rank prints (as JSON) the image sizes of its batches in each epoch of a --progressive
schedule, read through a persistent DataLoader worker (the size comes from shared memory)."""

from __future__ import annotations

import json

from trainer import data
from trainer.config import Config, DataConfig
from trainer.data.resolution import size_schedule
from trainer.data.transforms import Preprocess
from trainer.train.launch import build_accelerator


def main() -> None:
    # In a function: the loader and its persistent worker go away before the interpreter shuts down (a worker still
    # alive at shutdown was seen to hang the exit).
    cfg = DataConfig(data="digits", imgsz=32, progressive=16, progressive_ramp=(1, 3), workers=1)
    accelerator = build_accelerator(Config(data=cfg))
    dataset = data.Data(*data.load_splits(cfg))
    pre = Preprocess(32, 1, (0.5,), (0.25,), "bilinear", 1.0)
    spec = data.loader_spec(cfg, data.Backend("torch", "test"), pre)
    train, _ = data.build_loaders(accelerator, dataset, cfg, spec, 32, size_schedule(cfg, 3))  # sharded
    sizes = []
    for epoch in (1, 2, 3):
        train.set_epoch(epoch)
        sizes.append(sorted({batch.images.shape[-1] for batch in train}))  # every batch of the epoch
    out = {"rank": accelerator.process_index, "world": accelerator.num_processes, "sizes": sizes}
    print("SIZES " + json.dumps(out), flush=True)
    accelerator.end_training()


main()
