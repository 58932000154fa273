"""Console output, results.csv, config.yaml and experiment trackers.

Main-process-only side effects live here, so the engine never checks ranks: every method may be called on
every rank and does nothing where it should not.
"""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

RESULTS_COLUMNS = ("epoch", "train/loss", "val/loss", "val/top1", "val/top5", "lr")


def wandb_has_credentials() -> bool:
    """True when wandb could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"imgsz": 32}} -> {"data.imgsz": 32}; lists become strings (TensorBoard hparams need scalars)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


class Reporter:
    """What the user sees: terminal lines, the run folder's text files and the trackers."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.run_dir: Path | None = None
        self._said: set[str] = set()

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def print_once(self, message: str) -> None:
        """Print a notice once per run (e.g. why SyncBN is skipped)."""
        if message not in self._said:
            self._said.add(message)
            self.print(message)

    def start(
        self, run_dir: Path, record: dict[str, Any], trackers: list[str], project: str, resume: bool = False
    ) -> None:
        """Write config.yaml and start trackers. Every rank calls this (init_trackers is main-only inside).

        `resume`: the run folder exists and continues; its config.yaml and results.csv are kept."""
        self.run_dir = run_dir
        if self.is_main and not resume:
            with open(run_dir / "config.yaml", "w") as f:
                yaml.safe_dump(record, f, sort_keys=False)
            with open(run_dir / "results.csv", "w", newline="") as f:
                csv.writer(f).writerow(RESULTS_COLUMNS)
        if not trackers:
            return
        init_kwargs: dict[str, dict] = {}
        if "wandb" in trackers:
            wandb_kwargs: dict[str, Any] = {"name": run_dir.name, "dir": str(run_dir)}
            if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
                wandb_kwargs["mode"] = "offline"
                self.print(
                    f"wandb: no API key found, logging offline to {run_dir}/wandb; "
                    f"upload later with: wandb sync {run_dir}/wandb/offline-run-*"
                )
            init_kwargs["wandb"] = wandb_kwargs
        # TensorBoard writes under {logging_dir}/{project name}.
        self.accelerator.project_configuration.logging_dir = str(run_dir / "tensorboard")
        wandb_project = Path(project).name or "trainer"
        self.accelerator.init_trackers(wandb_project, config=flatten(record), init_kwargs=init_kwargs)

    def keep_results(self, epochs: int) -> None:
        """On resume: keep the results.csv rows of the first `epochs` epochs; later ones are trained again."""
        path = self.run_dir / "results.csv"
        if not self.is_main or not path.is_file():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= epochs]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        tmp.replace(path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)  # main process only, inside accelerate

    def epoch_end(
        self, epoch: int, epochs: int, metrics: dict[str, float], seconds: float, imgs_per_sec: float, best: bool
    ) -> None:
        row = [epoch, *(metrics[c] for c in RESULTS_COLUMNS[1:])]
        if self.is_main:
            with open(self.run_dir / "results.csv", "a", newline="") as f:
                csv.writer(f).writerow([row[0], *(f"{v:.6g}" for v in row[1:])])
            print(
                f"epoch {epoch}/{epochs}  train/loss {metrics['train/loss']:.4f}  val/loss {metrics['val/loss']:.4f}  "
                f"top1 {metrics['val/top1']:.4f}  top5 {metrics['val/top5']:.4f}  lr {metrics['lr']:.2e}  "
                f"{seconds:.1f}s  {imgs_per_sec:.0f} img/s{'  *best' if best else ''}",
                flush=True,
            )

    def finish(self, summary: dict[str, Any]) -> None:
        """Every rank calls this: end_training closes trackers on the main process."""
        if self.is_main and any(t.name == "wandb" for t in self.accelerator.trackers):
            self.accelerator.get_tracker("wandb", unwrap=True).summary.update(summary)
        self.accelerator.end_training()
        self.print(
            f"best val/top1 {summary['best/val_top1']:.4f} at epoch {summary['best/epoch']}, "
            f"{summary['time_s']:.0f}s in all. Results saved to {self.run_dir}"
        )
