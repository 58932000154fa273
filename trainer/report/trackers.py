"""Experiment trackers (wandb, TensorBoard) through accelerate's tracking API: how each starts for a run folder, and
what the end of a run sends to wandb. Called by `Reporter` on the main process only, each call under its guard (a
failing tracker is dropped, never the run)."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

from trainer.config import RunConfig
from trainer.report import evaluation, mistakes
from trainer.report.metrics import MultiLabelPredictions
from trainer.run.layout import BEST_WEIGHTS, WEIGHTS

WANDB_ID_FILE = "wandb_id.txt"
ID_ALPHABET = string.ascii_lowercase + string.digits
# the run folder's plots, sent at the end
PLOTS = ("results.png", "confusion_matrix.png", "val_predictions.png", mistakes.TOP_LOSSES_PNG)


def wandb_has_credentials() -> bool:
    """True when wandb could log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _shorter(path: Path) -> Path:
    """`path` relative to the working folder when it lies inside it (as the run folder is printed)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


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


def start_wandb(reporter, run: RunConfig, resume: bool) -> None:
    """Start wandb for `reporter`'s run folder: online with credentials, else offline with the sync command printed;
    a resumed run continues its stored id."""
    from accelerate.tracking import WandBTracker

    id_file = reporter.run_dir / WANDB_ID_FILE
    resuming = resume and id_file.exists()
    # wandb's own id format (8 lowercase letters and digits), chosen here so it can be stored before init.
    run_id = id_file.read_text().strip() if resuming else "".join(secrets.choice(ID_ALPHABET) for _ in range(8))
    id_file.write_text(run_id + "\n")
    # A user's WANDB_DIR (e.g. a scratch disk) wins over the run folder.
    wandb_root = os.environ.get("WANDB_DIR") or str(reporter.run_dir)
    kwargs: dict[str, Any] = {"name": reporter.run_dir.name, "dir": wandb_root, "id": run_id}
    kwargs.update(entity=run.entity or None, tags=run.tag_list() or None, notes=run.notes or None)
    if resuming:
        kwargs["resume"] = "allow"
    offline = not os.environ.get("WANDB_MODE") and not wandb_has_credentials()
    if offline:
        kwargs["mode"] = "offline"
    tracker = WandBTracker(run.wandb_project_name(), **kwargs)
    tracker.start()
    reporter.accelerator.trackers.append(tracker)
    if offline:
        folder = _shorter(Path(tracker.run.settings.wandb_dir))
        # The id ends every session's folder name, so one pattern uploads a resumed run's sessions in order.
        reporter.print(
            f"wandb: no API key found, logging offline to {folder}; "
            f"upload later with: wandb sync {folder}/offline-run-*-{run_id}*"
        )
    tracker.store_init_configuration(flatten(reporter.record))
    # Validation charts default to epochs on the x-axis; the summary keeps the best, not the last, value.
    tracker.run.define_metric("epoch")
    tracker.run.define_metric("val/*", step_metric="epoch")
    for name in ("val/top1", "val/map", "val/macro_f1", "val/balanced_acc"):
        tracker.run.define_metric(name, summary="max")
    tracker.run.define_metric("val/loss", summary="min")


def start_tensorboard(reporter, run: RunConfig) -> None:
    """Start TensorBoard in `{run}/tensorboard`."""
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(run.wandb_project_name(), reporter.run_dir / "tensorboard")
    tracker.start()
    reporter.accelerator.trackers.append(tracker)
    tracker.store_init_configuration(flatten(reporter.record))


def log_wandb_media(reporter, run, summary: dict[str, Any], val_split) -> None:
    """The end of a run on wandb: summary, plots, confusion matrix, a table of validation predictions, the best
    weights as an artifact."""
    import wandb

    run.summary.update({k: v for k, v in summary.items() if k != "run_dir"})
    media = {
        f"plots/{name.removesuffix('.png')}": wandb.Image(str(reporter.run_dir / name))
        for name in (*PLOTS, "reliability.png", "pr_curve.png")
        if (reporter.run_dir / name).exists()
    }
    if reporter.ece is not None:
        run.summary["val/ece"] = reporter.ece
    if reporter.best is not None and not isinstance(reporter.best[1], MultiLabelPredictions):
        _, preds = reporter.best
        names = reporter.record["dataset"]["class_names"]
        media["val/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=preds.labels.tolist(), preds=preds.predicted.tolist(), class_names=names
        )
        if val_split is not None:
            table = wandb.Table(columns=["index", "image", "true", "predicted", "confidence", "correct"])
            index, images = evaluation.readable_images(val_split, evaluation.sample_indices(preds, 96))
            for i, decoded in zip(index, images, strict=True):
                true, pred = int(preds.labels[i]), int(preds.predicted[i])
                confidence = float(preds.probs[i, 0]) if preds.probs is not None else float("nan")
                image = wandb.Image(decoded)
                table.add_data(int(i), image, names[true], names[pred], confidence, true == pred)
            media["val/predictions"] = table
    if reporter.best is not None:
        names = reporter.record["dataset"]["class_names"]
        pairs = [list(p) for p in mistakes.most_confused(reporter.best[1], names)]
        media["val/most_confused"] = wandb.Table(columns=["true", "predicted", "count"], data=pairs)
        if val_split is not None:
            media["val/top_losses"] = top_losses_table(reporter.best[1], names, val_split)
    run.log(media)
    best_weights = reporter.run_dir / WEIGHTS / BEST_WEIGHTS
    if best_weights.exists():
        artifact = wandb.Artifact(
            f"model-{run.id}",
            type="model",
            metadata={
                "val_top1": summary.get("best/val_top1"),
                summary.get("best/metric", "best"): summary.get("best/value"),
                "epoch": summary.get("best/epoch"),
            },
        )
        artifact.add_file(str(best_weights))
        run.log_artifact(artifact, aliases=["best", f"epoch-{summary.get('best/epoch')}"])


def log_table_to_wandb(run_dir: Path, project: str, table: str, rows: list[dict[str, Any]], config: dict) -> str:
    """A one-off wandb run in `run_dir` holding `rows` as the table `table` (`trainer benchmark`): online with
    credentials, else offline. Returns what was done, for the console."""
    import wandb

    offline = not os.environ.get("WANDB_MODE") and not wandb_has_credentials()
    run = wandb.init(
        project=project, dir=str(run_dir), name=run_dir.name, config=config, mode="offline" if offline else None
    )
    columns = list(rows[0])
    run.log({table: wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])})
    run.finish()
    if offline:
        return f"wandb: logged offline; upload with: wandb sync {_shorter(Path(run.settings.sync_dir))}"
    return f"wandb: logged to {run.url}"


def top_losses_table(preds, class_names: list[str], val_split):
    """The top losses as a wandb table: image, file, true, predicted, probability, loss."""
    import wandb

    table = wandb.Table(columns=["rank", "image", "file", "true", "predicted", "probability", "loss"])
    found = mistakes.top_losses(preds, class_names, mistakes.file_names(val_split))
    index, images = evaluation.readable_images(val_split, [m.index for m in found])
    decoded = dict(zip(index.tolist(), images, strict=True))
    for rank, m in enumerate(found, start=1):
        if m.index in decoded:
            table.add_data(rank, wandb.Image(decoded[m.index]), m.file, m.true, m.predicted, m.probability, m.loss)
    return table


def log_wandb_tables(run, tables: dict[str, tuple[list[str], list[list]]]) -> None:
    """Tables on wandb, one per name; numpy arrays and PIL images in cells become wandb images."""
    import numpy as np
    import wandb

    def cell(value):
        return wandb.Image(value) if isinstance(value, np.ndarray) or hasattr(value, "getpixel") else value

    run.log(
        {
            name: wandb.Table(columns=columns, data=[[cell(v) for v in row] for row in rows])
            for name, (columns, rows) in tables.items()
        }
    )
