"""Weight files: `{run}/weights/last.safetensors` and `best.safetensors`, with the metadata that rebuilds the model
and its preprocessing without trainer; and the file mode the user's umask gives them.

Light at import: torch, safetensors and the data package are not loaded until a file is written or read."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.run.finite import nonfinite_names, refuse_nonfinite
from trainer.run.layout import BEST_WEIGHTS, LAST_WEIGHTS

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from trainer.data import Preprocess


def _proc_umask() -> int | None:
    """The umask as Linux reports it, read without changing it (None where /proc cannot say)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except (OSError, ValueError):
        return None


_first_umask: int | None = None
_first_umask_lock = threading.Lock()


def _umask() -> int:
    """The process's umask. Read from /proc (Linux) each time, without changing it.

    Elsewhere os.umask reads the umask only by setting it, and a thread creating a file meanwhile would get the
    temporary value. So it is read that way once, at the first use (never at import), under a lock, with the
    usual 0o022 as the temporary value, and kept: trainer never changes the umask, the user sets it before the run.
    """
    umask = _proc_umask()
    if umask is not None:
        return umask
    global _first_umask
    with _first_umask_lock:
        if _first_umask is None:
            _first_umask = os.umask(0o022)
            os.umask(_first_umask)
        return _first_umask


def match_umask(path: Path) -> None:
    """Give a file we wrote (every file under it, for a folder) the mode the user's umask gives any new file.

    safetensors writes through a private temporary file (mode 0600): teammates could not read shared weights."""
    mode = 0o666 & ~_umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)


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


def save_epoch_weights(
    accelerator: Accelerator,
    model,
    weights_dir: Path,
    metadata: dict[str, str],
    is_best: bool,
    best_model=None,
    best_metadata: dict[str, str] | None = None,
    step: int = 0,
):
    """Every rank calls this: get_state_dict gathers sharded (FSDP/DeepSpeed) weights; the main process writes
    last.safetensors, and best.safetensors when `is_best` (from `best_model`, e.g. the EMA, when given).

    Weights holding a NaN or an infinity are refused on every rank together (UserError naming them and `step`), and
    the files written before stay as they were."""
    # Collective under FSDP: every rank sends its shards and the main process receives the full, plain timm state
    # dict (on the CPU; the other ranks get an empty one). Under DDP it is the local state dict.
    state_dict = accelerator.get_state_dict(model)
    # is_best is the same on every rank (metrics are gathered), so all ranks make this call or none.
    other_best = is_best and best_model is not None and best_model is not model
    best_state = accelerator.get_state_dict(best_model) if other_best else state_dict  # Collective: as above
    bad = nonfinite_names(state_dict.items())
    if other_best:
        bad += [f"{name} (best)" for name in nonfinite_names(best_state.items())]
    kept = f"{weights_dir} keeps the previous epoch's files"
    refuse_nonfinite(accelerator, bad, "the weights", step, kept)  # Collective: every rank calls it
    if accelerator.is_main_process:
        save_weights(state_dict, weights_dir / LAST_WEIGHTS, metadata)
        if is_best:
            save_weights(best_state, weights_dir / BEST_WEIGHTS, best_metadata or metadata)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Main process only. Writes to a temporary name first so a kill mid-write never leaves a torn file. Refuses
    (UserError) weights holding a NaN or an infinity, leaving `path` as it was."""
    from safetensors.torch import save_file

    bad = nonfinite_names(state_dict.items())
    if bad:
        refuse_nonfinite(None, bad, str(path), int(metadata.get("step", 0) or 0), f"{path} is unchanged")

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    match_umask(tmp)
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a weights file written by `save_weights`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
