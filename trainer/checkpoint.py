"""Run folders and weight files. Each call site says whether every rank or only the main process runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from trainer.config import UserError
from trainer.data import Preprocess


def increment_path(path: Path, exist_ok: bool) -> Path:
    """`runs/train/exp` -> `runs/train/exp2`, `exp3`, ... (YOLOv5 style) unless `exist_ok`."""
    if exist_ok or not path.exists():
        return path
    pattern = re.compile(re.escape(path.name) + r"(\d+)$")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return path.with_name(f"{path.name}{max([1, *taken]) + 1}")


def create_run_dir(accelerator: Accelerator, project: str, name: str, exist_ok: bool, weights_dir: bool = True) -> Path:
    """Every rank calls this; the main process picks and creates the folder (with `weights/` unless told not
    to), the others receive its path."""
    chosen = [None]
    if accelerator.is_main_process:
        run_dir = increment_path(Path(project) / name, exist_ok)
        try:
            (run_dir / "weights" if weights_dir else run_dir).mkdir(parents=True, exist_ok=True)
            chosen = [str(run_dir)]
        except OSError as e:
            chosen = [f"error: cannot create run folder {run_dir}: {e.strerror}; choose another --project"]
    # Collective: every rank must take part, or the others wait forever.
    chosen = broadcast_object_list(chosen, from_process=0) if accelerator.num_processes > 1 else chosen
    if chosen[0].startswith("error: "):
        raise UserError(chosen[0].removeprefix("error: "))
    return Path(chosen[0])


def weights_metadata(model_name: str, class_names: list[str], pre: Preprocess, **extra) -> dict[str, str]:
    """safetensors metadata (strings only): enough to rebuild the model and its preprocessing without trainer."""
    meta = {
        "format": "pt",
        "model_name": model_name,
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(class_names),
        "imgsz": str(pre.imgsz),
        "in_chans": str(pre.in_chans),
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "interpolation": pre.interpolation,
        "crop_pct": str(pre.crop_pct),
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_epoch_weights(accelerator: Accelerator, model, weights_dir: Path, metadata: dict[str, str], is_best: bool):
    """Every rank calls this: get_state_dict gathers sharded (FSDP/DeepSpeed) weights; the main process writes
    last.safetensors, and best.safetensors when `is_best`."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_weights(state_dict, weights_dir / "last.safetensors", metadata)
        if is_best:
            save_weights(state_dict, weights_dir / "best.safetensors", metadata)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Main process only. Writes to a temporary name first so a kill mid-write never leaves a torn file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a weights file written by `save_weights`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
