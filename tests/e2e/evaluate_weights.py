"""Evaluate a saved weights file on the embedded validation split with trainer's own components.

Run plainly (1 rank) or under torchrun (N ranks); rank 0 writes the metrics, the
per-sample labels and predictions, and the world size as JSON.
Usage: python evaluate_weights.py WEIGHTS OUT_JSON
"""

import json
import sys

from safetensors.torch import load_file

from trainer import data
from trainer.config import Config, DataConfig, ModelConfig, build_config
from trainer.run.weights import read_metadata
from trainer.train.launch import build_accelerator
from trainer.train.loop import evaluate
from trainer.train.model import build_model


def main(weights: str, out: str) -> None:
    meta = read_metadata(weights)
    cfg: Config = build_config({"run": {"tracker": "none"}, "data": {"imgsz": int(meta["imgsz"])}})
    accelerator = build_accelerator(cfg)
    splits, info = data.load_splits(DataConfig(imgsz=int(meta["imgsz"])))
    model = build_model(
        ModelConfig(model=meta["model_name"]), len(info.class_names), int(meta["in_chans"]), int(meta["imgsz"])
    )
    model.load_state_dict(load_file(weights))
    pre = data.resolve_preprocess(cfg.data, model, int(meta["in_chans"]))
    # Val batches of 20 per rank: with 2 ranks the 500 images end in a padded batch that gather_for_metrics must drop.
    spec = data.loader_spec(DataConfig(workers=0), data.Backend("torch", "test"), pre)
    _, val_loader = data.build_loaders(accelerator, data.Data(splits, info), DataConfig(workers=0), spec, 10)
    model = accelerator.prepare(model)
    metrics, preds = evaluate(accelerator, model, val_loader, len(info.class_names))
    if accelerator.is_main_process:
        with open(out, "w") as f:
            record = {"labels": preds.labels.tolist(), "predicted": preds.predicted.tolist()}
            json.dump({**metrics, **record, "world_size": accelerator.num_processes}, f)
    # Collective: leave together, as `trainer val` does; a rank that tears the group down while rank 0 still writes
    # can abort in gloo ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
