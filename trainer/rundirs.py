"""Run folders: `{project}/{name}`, numbered `exp2`, `exp3`, ... unless `exist_ok`. Light: no torch, no data package
(accelerate is imported only when several processes must agree on the folder)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import UserError
from trainer.files import WEIGHTS

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass(frozen=True)
class RunFolder:
    """Where a command writes its outputs: `--project`, `--name`, `--exist-ok`."""

    project: str
    name: str = "exp"
    exist_ok: bool = False


def increment_path(path: Path, exist_ok: bool) -> Path:
    """`runs/train/exp` -> `runs/train/exp2`, `exp3`, ... (YOLOv5 style) unless `exist_ok`."""
    if exist_ok or not path.exists():
        return path
    pattern = re.compile(re.escape(path.name) + r"(\d+)$")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return path.with_name(f"{path.name}{max([1, *taken]) + 1}")


def make_run_dir(folder: RunFolder, weights_dir: bool = False) -> Path:
    """Pick and create the run folder (with `weights/` when asked) in this process; UserError if it cannot be made."""
    run_dir = increment_path(Path(folder.project) / folder.name, folder.exist_ok)
    try:
        (run_dir / WEIGHTS if weights_dir else run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {run_dir}: {e.strerror}; choose another --project") from e
    return run_dir


def create_run_dir(accelerator: Accelerator, folder: RunFolder, weights_dir: bool = True) -> Path:
    """Every rank calls this; the main process picks and creates the folder (with `weights/` unless told not
    to), the others receive its path."""
    chosen = [None]
    if accelerator.is_main_process:
        try:
            chosen = [str(make_run_dir(folder, weights_dir))]
        except UserError as e:
            chosen = [f"error: {e}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        # Collective: every rank must take part, or the others wait forever.
        chosen = broadcast_object_list(chosen, from_process=0)
    if chosen[0].startswith("error: "):
        raise UserError(chosen[0].removeprefix("error: "))
    return Path(chosen[0])
