"""The names of the files and folders in a run and in its checkpoints. Light: no torch, no data package.

{run}/config.yaml                  the resolved config and the launch's facts (report.reporter.Reporter.start)
{run}/results.csv                  one row per epoch
{run}/weights/last.safetensors     the latest epoch's weights (weights.save_epoch_weights)
{run}/weights/best.safetensors     the best epoch's (the EMA's when it scored higher)
{run}/checkpoints/step-N/          complete resumable checkpoints (checkpointer.Checkpointer)
    trainer_state_{rank}.json      the loop's position and sums, one per rank
    rank_buffers_{rank}.safetensors  buffers each rank keeps for itself (the EMA's BatchNorm statistics)
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.csv"
WEIGHTS = "weights"
LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"  # a complete checkpoint; a save in progress (or killed) is a folder starting with '.'
STATE_FILE = "trainer_state_{rank}.json"  # one per rank: the loss sums of a partial epoch differ between ranks
BUFFERS_FILE = "rank_buffers_{rank}.safetensors"  # one per rank: buffers that differ between ranks (see Checkpointer)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. Temporary folders (a save in progress or killed) start with '.'."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir() and p.name.removeprefix(STEP_PREFIX).isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX)))
