"""Console output, progress, the run folder's reports; the trackers started and fed (trainer.report.trackers).

Main-process-only side effects live here, so the engine never checks ranks: every method may be called on
every rank and does nothing where it should not. A tracker that fails (network, quota, a broken install) is
reported once and dropped; it never stops training.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from trainer.config import RunConfig, UserError
from trainer.report import evaluation, mistakes
from trainer.report.metrics import MultiLabelPredictions, multilabel_rows
from trainer.report.progress import Progress
from trainer.report.trackers import log_wandb_media, log_wandb_tables, start_tensorboard, start_wandb
from trainer.run.layout import BEST_WEIGHTS, CONFIG_FILE, LAST_WEIGHTS, RESULTS_FILE, WEIGHTS
from trainer.run.writes import append_text, atomic_file, disk_errors

RESULTS_COLUMNS = (
    "epoch",
    "imgsz",
    "train/loss",
    "val/loss",
    "val/top1",
    "val/top5",
    "val/macro_f1",
    "val/balanced_acc",
    "lr",
)
EMA_COLUMNS = ("val/loss_ema", "val/top1_ema", "val/top5_ema")  # appended when the run keeps a weight EMA
MULTI_LABEL_COLUMNS = ("epoch", "imgsz", "train/loss", "val/loss", "val/map", "val/micro_f1", "val/macro_f1", "lr")
MULTI_LABEL_EMA_COLUMNS = ("val/loss_ema", "val/map_ema", "val/macro_f1_ema")
PRINTED_CLASSES = 40  # larger per-class tables print the worst classes; per_class.csv has them all
GRID_IMAGES = 25
KEPT = "the weights, checkpoints and results.csv rows written before are kept"


EPOCH_LINE = (  # (metric, its name on the epoch line), printed when the epoch has it
    ("val/top1", "top1"),
    ("val/top5", "top5"),
    ("val/map", "mAP"),
    ("val/micro_f1", "micro_f1"),
    ("val/macro_f1", "macro_f1"),
    ("val/balanced_acc", "bal_acc"),
    ("val/top1_ema", "top1_ema"),
    ("val/map_ema", "mAP_ema"),
)


def _scores(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {metrics[key]:.4f}" for key, name in EPOCH_LINE if key in metrics)


def _header(path: Path) -> tuple[str, ...]:
    with open(path, newline="") as f:
        return tuple(next(csv.reader(f), ()))


class Reporter:
    """What the user sees: terminal lines, the run folder's files and the trackers."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.run_dir: Path | None = None
        self.record: dict[str, Any] = {}
        self.columns = RESULTS_COLUMNS
        self.progress: Progress | None = None
        self.epoch = 0
        self.best: tuple[int, evaluation.Predictions] | None = None
        self.best_is_best = False  # False: self.best holds the latest epoch (resumed after the best one)
        self.ece: float | None = None  # of the best epoch's predictions, once the final reports are written
        self.train_images = 0
        self.train_seconds = 0.0
        self._interval_images = 0
        self._interval_start = time.monotonic()
        self._said: set[str] = set()

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def print_once(self, message: str) -> None:
        """Print a notice once per run (e.g. why SyncBN is skipped)."""
        if message not in self._said:
            self._said.add(message)
            self.print(message)

    # ---- start -------------------------------------------------------------------------------------------

    def start(self, run_dir: Path, record: dict[str, Any], run: RunConfig, resume: bool = False) -> None:
        """Write config.yaml, start results.csv and the trackers (main process only).

        With `resume`, the run folder continues: its config.yaml and results.csv are kept (see keep_results) and
        the wandb run stored in it is continued.
        """
        self.run_dir, self.record = run_dir, record
        multilabel = record.get("dataset", {}).get("task") == "multilabel"
        ema = record.get("optim", {}).get("ema")
        if multilabel:
            self.columns = MULTI_LABEL_COLUMNS + (MULTI_LABEL_EMA_COLUMNS if ema else ())
        else:
            self.columns = RESULTS_COLUMNS + (EMA_COLUMNS if ema else ())
        if not self.is_main:
            return
        with disk_errors(run_dir):
            if not resume:
                with atomic_file(run_dir / CONFIG_FILE) as tmp, open(tmp, "w") as f:
                    yaml.safe_dump(record, f, sort_keys=False)
            if resume and (run_dir / RESULTS_FILE).exists():
                self.columns = _header(run_dir / RESULTS_FILE) or self.columns  # a run begun before a new column
            else:
                with atomic_file(run_dir / RESULTS_FILE) as tmp, open(tmp, "w", newline="") as f:
                    csv.writer(f).writerow(self.columns)
        self.start_trackers(run_dir, record, run, resume)

    def start_trackers(self, run_dir: Path, record: dict[str, Any], run: RunConfig, resume: bool = False) -> None:
        """Start the trackers for `run_dir` with `record` as their config (main process only; `start` calls it)."""
        self.run_dir, self.record = run_dir, record
        if not self.is_main:
            return
        trackers = run.trackers()
        if "wandb" in trackers:
            self._guard("wandb", lambda: start_wandb(self, run, resume))
        if "tensorboard" in trackers:
            self._guard("tensorboard", lambda: start_tensorboard(self, run))

    def log_tables(self, tables: dict[str, tuple[list[str], list[list]]]) -> None:
        """wandb tables (name -> (columns, rows); numpy or PIL images become wandb images), then the trackers end.
        Main process only; for commands without a training loop (trainer data audit)."""
        wandb_tracker = self._tracker("wandb")
        if self.is_main and wandb_tracker is not None:
            self._guard("wandb", lambda: log_wandb_tables(wandb_tracker.run, tables))
        for tracker in list(self.accelerator.trackers):
            self._guard(tracker.name, tracker.finish)
        self.accelerator.trackers.clear()

    def keep_results(self, epochs: int) -> None:
        """On resume: keep the results.csv rows of the first `epochs` epochs; later ones are trained again."""
        path = self.run_dir / RESULTS_FILE
        if not self.is_main or not path.is_file():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= epochs]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        tmp.replace(path)

    def _guard(self, name: str, action) -> bool:
        """Run a tracker action; on any failure warn once, drop that tracker and carry on training."""
        try:
            action()
            return True
        except Exception as e:  # a tracker is never worth a lost training run
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.print(f"warning: {name} failed ({type(e).__name__}: {first_line}); training continues without it")
            self.accelerator.trackers[:] = [t for t in self.accelerator.trackers if t.name != name]
            return False

    def _tracker(self, name: str):
        return next((t for t in self.accelerator.trackers if t.name == name), None)

    # ---- during training ---------------------------------------------------------------------------------

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log to every tracker (main process only; trackers exist nowhere else)."""
        for tracker in list(self.accelerator.trackers):
            self._guard(tracker.name, lambda t=tracker: t.log(metrics, step=step))

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Open the progress display for one epoch of `batches` micro-batches on this rank."""
        self.epoch = epoch
        self._interval_images, self._interval_start = 0, time.monotonic()
        if self.is_main:
            self.progress = Progress(batches, f"epoch {epoch}/{epochs}")

    def advance(self, images: int) -> None:
        """One micro-batch done; `images` counts all ranks."""
        self._interval_images += images
        if self.progress is not None:
            self.progress.update()

    def log_train(self, step: int, loss: float, lr: float) -> None:
        """Every --log-every optimizer steps: trackers get loss, lr, throughput and the fractional epoch."""
        now = time.monotonic()
        imgs_per_sec = self._interval_images / max(now - self._interval_start, 1e-9)
        self._interval_images, self._interval_start = 0, now
        done = self.progress.done / self.progress.total if self.progress and self.progress.total else 0.0
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/imgs_per_sec": imgs_per_sec,
            "epoch": self.epoch - 1 + done,
        }
        self.log(metrics, step=step)
        if self.progress is not None:
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "img/s": f"{imgs_per_sec:.0f}"}
            if self.accelerator.device.type == "cuda":
                import torch

                postfix["mem"] = f"{torch.cuda.max_memory_reserved() / 2**30:.1f}G"
            self.progress.set_postfix(**postfix)

    def epoch_end(
        self,
        epoch: int,
        epochs: int,
        metrics: dict[str, float],
        seconds: float,
        imgs_per_sec: float,
        best: bool,
        preds: evaluation.Predictions | None = None,
    ) -> None:
        """results.csv row and the epoch line; keeps the best epoch's predictions for the final reports."""
        self.train_images += round(imgs_per_sec * seconds)
        self.train_seconds += seconds
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        # A resumed run whose best epoch ran before the resume reports its latest epoch instead (predictions are not
        # checkpointed); a best epoch of this session always takes over.
        if preds is not None and (best or not self.best_is_best):
            self.best, self.best_is_best = (epoch, preds), best
        row = [epoch, *(metrics.get(c, float("nan")) for c in self.columns[1:])]
        line = io.StringIO()
        csv.writer(line).writerow([row[0], *(f"{v:.6g}" for v in row[1:])])
        with disk_errors(self.run_dir / RESULTS_FILE, KEPT):
            append_text(self.run_dir / RESULTS_FILE, line.getvalue())
        size = f"  {metrics['imgsz']} px" if "imgsz" in metrics else ""
        print(
            f"epoch {epoch}/{epochs}{size}  train/loss {metrics['train/loss']:.4f}  "
            f"val/loss {metrics['val/loss']:.4f}  "
            f"{_scores(metrics)}  lr {metrics['lr']:.2e}  "
            f"{seconds:.1f}s  {imgs_per_sec:.0f} img/s{'  *best' if best else ''}",
            flush=True,
        )

    # ---- end -----------------------------------------------------------------------------------------------

    def finish(self, summary: dict[str, Any], val_split=None, end: bool = True) -> None:
        """Every rank calls this. The main process writes the final reports and media and closes the trackers.

        Args:
            summary: best/val_top1, best/epoch, time_s and run_dir from the engine.
            val_split: the raw validation dataset (an "image" per row, dataset order) for the prediction grid.
            end: end the process group too (False: another training follows in this process).
        """
        failed = None
        if self.is_main:
            try:
                with disk_errors(self.run_dir, KEPT):
                    written = self._write_reports(val_split)
            except UserError as e:  # raised after the ranks have met below, so none of them waits for this one
                failed, written = e, []
            summary = {**summary, "train/imgs_per_sec": self.train_images / max(self.train_seconds, 1e-9)}
            wandb_tracker = self._tracker("wandb")
            if wandb_tracker is not None:
                self._guard("wandb", lambda: log_wandb_media(self, wandb_tracker.run, summary, val_split))
            for tracker in list(self.accelerator.trackers):
                self._guard(tracker.name, tracker.finish)
            self.accelerator.trackers.clear()
            self._print_summary(summary, written)
        # Collective: ranks leave together, after the main process has written everything (a rank that tears
        # the gloo group down while rank 0 still works was seen to abort it).
        self.accelerator.wait_for_everyone()
        if end:
            self.accelerator.end_training()
        if failed is not None:
            raise failed

    def _write_reports(self, val_split) -> list[str]:
        """results.png, and from the best epoch's predictions: per-class table, confusion matrix, image grid."""
        written = []
        evaluation.save_results_png(self.run_dir / RESULTS_FILE, self.run_dir / "results.png")
        written.append("results.png")
        if self.best is None:
            return written
        epoch, preds = self.best
        names = self.record["dataset"]["class_names"]
        multilabel = isinstance(preds, MultiLabelPredictions)
        rows = multilabel_rows(preds, names) if multilabel else evaluation.per_class_rows(preds, names)
        evaluation.save_per_class_csv(rows, self.run_dir / "per_class.csv")
        shown = rows
        worst = "ap" if multilabel else "top1"
        if len(rows) > PRINTED_CLASSES + 1:
            shown = [*sorted(rows[:-1], key=lambda r: r[worst])[:20], rows[-1]]
        more = "" if shown is rows else f", the 20 worst of {len(rows) - 1} classes (all in per_class.csv)"
        which = f"the best epoch ({epoch})" if self.best_is_best else f"epoch {epoch} (the best ran before the resume)"
        what = f"AP and scores at threshold {preds.threshold:g}" if multilabel else "accuracy"
        print(f"per-class {what} at {which}{more}:\n{evaluation.format_per_class(shown)}", flush=True)
        written.append("per_class.csv")
        written += mistakes.write_mistakes(self.run_dir, preds, names, val_split)  # top losses, most confused
        if multilabel:
            evaluation.save_pr_curves_png(preds, names, self.run_dir / "pr_curve.png")
            return [*written, "pr_curve.png"]
        cm = evaluation.confusion_matrix(preds, len(names))
        evaluation.save_confusion_matrix_png(cm, names, self.run_dir / "confusion_matrix.png")
        written.append("confusion_matrix.png")
        if preds.probs is not None:
            self.ece = evaluation.save_reliability_png(preds, self.run_dir / "reliability.png")
            print(f"calibration: expected calibration error (ECE, 15 bins) {self.ece:.4f}; see reliability.png")
            written.append("reliability.png")
        if val_split is not None:
            index, images = evaluation.readable_images(val_split, evaluation.sample_indices(preds, GRID_IMAGES))
            evaluation.save_prediction_grid(
                images, preds.labels[index], preds.predicted[index], names, self.run_dir / "val_predictions.png"
            )
            written.append("val_predictions.png")
        return written

    def _print_summary(self, summary: dict[str, Any], written: list[str]) -> None:
        key = summary.get("best/metric", "val/top1")
        value = summary.get("best/value", summary.get("best/val_top1"))
        print(
            f"best {key} {value:.4f} at epoch {summary['best/epoch']}, "
            f"{summary['time_s']:.0f}s in all, {summary['train/imgs_per_sec']:.0f} img/s training. "
            f"Results saved to {self.run_dir}",
            flush=True,
        )
        if summary.get("early_stop/reason"):
            print(f"  {summary['early_stop/reason']}", flush=True)
        print(f"  weights: {self.run_dir / WEIGHTS}/{BEST_WEIGHTS}, {LAST_WEIGHTS}", flush=True)
        print(f"  reports: {RESULTS_FILE}, {', '.join(written)}", flush=True)
