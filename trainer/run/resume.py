"""`--resume [RUN_DIR|auto]`: find the run and rebuild its config. Light imports only: the CLI runs this before torch
loads.

A resumed run continues the stored config. Flags given with `--resume` may change only how the run is carried out
(workers, trackers, logging, checkpoint cadence), never what it computes (model, data, batch size, schedule, ...).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from trainer.config import BATCH_AUTO, SECTIONS, Config, RunConfig, UserError, build_config, load_yaml
from trainer.run.layout import CONFIG_FILE, STATE_FILE, checkpoint_dirs

LATEST = "latest"  # `--resume` with no folder
AUTO = "auto"  # `--resume auto`: continue {project}/{name} if it holds a checkpoint, else start the run there
# Settings that do not change what the run computes; given with --resume they replace the stored ones.
HARMLESS = frozenset(
    {"workers", "tracker", "log_every", "debug", "allow_download", "dist_backend"}
    | {"checkpoint_every", "keep_checkpoints", "grad_checkpointing", "dist_timeout"}
    | {"data_changed"}  # not what the run computes: permission to continue it on data that changed (checked later)
)
# Settings that only locate the run folder: with --resume they find it, the stored values are kept.
LOCATORS = frozenset({"project", "name", "exist_ok"})


def find_run_dir(resume: str, project: str, name: str | None) -> Path:
    """The folder to resume: RUN_DIR as given; with `--resume` alone, {project}/{name} when --name is given, else the
    run under --project whose newest checkpoint is the most recent."""
    if resume != LATEST or Path(resume).is_dir():
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise UserError(f"--resume {resume}: no such run folder; give a run folder such as runs/train/exp")
    elif name:
        run_dir = Path(project) / name
        if not run_dir.is_dir():
            raise UserError(f"--resume: no run folder {run_dir}; check --project and --name")
    else:
        runs = [p for p in Path(project).glob("*") if checkpoint_dirs(p)] if Path(project).is_dir() else []
        if not runs:
            raise UserError(f"--resume: no run with a checkpoint under {project}; name the run: --resume RUN_DIR")
        run_dir = max(runs, key=lambda p: checkpoint_dirs(p)[-1].stat().st_mtime)
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"--resume {run_dir}: not a trainer run folder (no config.yaml); give a folder under runs/")
    return run_dir


def auto_resume(given: dict[str, dict[str, Any]]) -> tuple[Config, Path | None]:
    """`--resume auto`: one command line that starts a run and continues it after every restart (torchrun
    --max-restarts, a requeued SLURM job, the user running it again).

    {project}/{name} as named, never incremented: with a complete checkpoint, returns its stored config with the
    harmless settings of `given` and the folder to resume; without one (no folder yet, or stopped before its first
    save), the config `given` with --exist-ok, and None: a new run in that folder. Every process decides alone from
    the same files, and alike: a checkpoint only ever appears complete (renamed into place after every rank wrote its
    part), and none is written before all of them have decided (a save needs them all). The engine checks that they
    did decide alike.
    """
    run = given.get("run") or {}
    run_dir = Path(run.get("project", RunConfig.project)) / run.get("name", RunConfig.name)
    if checkpoint_dirs(run_dir):
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"--resume auto: {run_dir} has checkpoints but no config.yaml; choose another --name")
        return resume_config(run_dir, given), run_dir
    fresh = {section: dict(values) for section, values in given.items()}
    fresh.setdefault("run", {})["exist_ok"] = True
    return build_config(fresh), None


def finished(run_dir: Path, epochs: int) -> bool:
    """Whether the newest checkpoint of the run is its last epoch's, or early stopping ended the run there (an
    unreadable one is left to the loader)."""
    state = _newest_state(run_dir)
    try:
        return bool(state) and (state["epoch"] >= epochs or stopped_early(run_dir) > 0)
    except (KeyError, TypeError):
        return False


def stopped_early(run_dir: Path) -> int:
    """The epoch --patience ended the run at, by its newest checkpoint; 0 if it did not (or none is readable)."""
    state = _newest_state(run_dir)
    stopped = state.get("stopped_epoch", 0) if isinstance(state, dict) else 0
    return stopped if isinstance(stopped, int) else 0


def _newest_state(run_dir: Path) -> dict:
    found = checkpoint_dirs(run_dir)
    try:
        return json.loads((found[-1] / STATE_FILE.format(rank=0)).read_text()) if found else {}
    except (OSError, ValueError):
        return {}


def resume_config(run_dir: Path, given: dict[str, dict[str, Any]]) -> Config:
    """The run's stored config, with the harmless settings in `given` applied; any other difference is refused."""
    try:
        stored_values = load_yaml(str(run_dir / CONFIG_FILE))
        stored = build_config(stored_values)
    except UserError as e:
        raise UserError(f"--resume {run_dir}: its config.yaml is unusable ({e}); the run cannot be resumed") from None
    merged_values = {section: dict(stored_values.get(section) or {}) for section in SECTIONS}
    for section, values in given.items():
        # --batch-size auto was resolved to the number config.yaml holds: the same command line resumes
        kept = {k: v for k, v in values.items() if k not in LOCATORS and not (k == "batch_size" and v == BATCH_AUTO)}
        merged_values.setdefault(section, {}).update(kept)
    merged = build_config(merged_values)
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(stored, section)):
            old, new = getattr(getattr(stored, section), f.name), getattr(getattr(merged, section), f.name)
            if old != new and f.name not in HARMLESS:
                flag = "--" + f.name.replace("_", "-")
                raise UserError(
                    f"--resume: {flag} {_show(new)} differs from the run's {_show(old)}; a resumed run keeps its "
                    "model, data and schedule: drop the flag, or start a new run without --resume"
                )
    return merged


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
