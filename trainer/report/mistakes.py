"""The model's worst mistakes, from gathered predictions: top losses and the most confused pairs of classes (fastai's
`ClassificationInterpretation.plot_top_losses` and `most_confused`), as top_losses.png, top_losses.csv and
most_confused.csv.

Pure functions on numpy arrays in dataset order, no rank logic: the main process writes (report.reporter, use.val).
Multi-label: an image's error is its largest per-label error |target - probability|, and a "confusion" is a label
missed in an image that got another label it does not have.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.exclude import image_paths
from trainer.report.evaluation import pyplot, readable_images
from trainer.report.metrics import MultiLabelPredictions
from trainer.run.writes import atomic_file

TOP_LOSSES = 16  # images in top_losses.png (a 4 x 4 grid) and rows of top_losses.csv
TOP_LOSSES_PNG, TOP_LOSSES_CSV, MOST_CONFUSED_CSV = "top_losses.png", "top_losses.csv", "most_confused.csv"
TOP_LOSSES_CAM_PNG = "top_losses_cam.png"  # val --cam: the same grid with heatmaps


@dataclass(frozen=True)
class Mistake:
    """One of the top losses: where it is in the split, its file, what it is and what the model said."""

    index: int
    file: str
    true: str
    predicted: str
    probability: float  # of the predicted class (multi-label: of the worst label)
    loss: float  # the sample's validation loss
    target: int  # the class a heatmap shows: the predicted one (multi-label: the worst label)
    error: float = float("nan")  # multi-label: the largest |target - probability| of the image


def file_names(split) -> list[str]:
    """Each image's file path in `split` (a map-style dataset), in its order; `#N` (its row) where the images are
    stored bytes without a path."""
    if hasattr(split, "with_format"):  # a datasets.Dataset: the paths read as one Arrow column, no image decoded
        paths = image_paths(split) or [None] * len(split)
    else:  # any other sequence of rows
        paths = [row["image"].get("path") if isinstance(row["image"], dict) else None for row in split]
    return [p or f"#{i}" for i, p in enumerate(paths)]


def top_losses(preds, class_names: list[str], files: list[str], k: int = TOP_LOSSES) -> list[Mistake]:
    """The `k` samples with the highest loss (multi-label: the largest per-label error), worst first; ties keep
    dataset order, so any process count gives the same list."""
    if isinstance(preds, MultiLabelPredictions):
        errors = np.abs(preds.targets.astype(np.float32) - preds.scores)
        worst = errors.max(axis=1)
        order = np.argsort(-worst, kind="stable")[:k]
        rows = []
        for i in order:
            label = int(errors[i].argmax())
            rows.append(
                Mistake(
                    int(i),
                    files[i],
                    " ".join(class_names[j] for j in np.flatnonzero(preds.targets[i])) or "-",
                    " ".join(class_names[j] for j in np.flatnonzero(preds.predicted[i])) or "-",
                    float(preds.scores[i, label]),
                    float(preds.loss[i]),
                    label,
                    float(worst[i]),
                )
            )
        return rows
    order = np.argsort(-preds.loss.astype(np.float64), kind="stable")[:k]
    probability = preds.probs[:, 0] if preds.probs is not None else np.full(len(preds), np.nan)
    return [
        Mistake(
            int(i),
            files[i],
            class_names[preds.labels[i]],
            class_names[preds.predicted[i]],
            float(probability[i]),
            float(preds.loss[i]),
            int(preds.predicted[i]),
        )
        for i in order
    ]


def most_confused(preds, class_names: list[str], min_count: int = 1) -> list[tuple[str, str, int]]:
    """(true, predicted, count) for every pair of different classes seen at least `min_count` times, most frequent
    first (multi-label: a label missed in an image, and a label wrongly predicted in the same image)."""
    n = len(class_names)
    if isinstance(preds, MultiLabelPredictions):
        truth = preds.targets.astype(bool)
        missed = (truth & ~preds.predicted).astype(np.int64)
        wrong = (~truth & preds.predicted).astype(np.int64)
        counts = missed.T @ wrong
    else:
        flat = preds.labels.astype(np.int64) * n + preds.predicted.astype(np.int64)
        counts = np.bincount(flat, minlength=n * n).reshape(n, n)
    np.fill_diagonal(counts, 0)
    pairs = [(int(counts[i, j]), i, j) for i, j in zip(*np.nonzero(counts >= min_count), strict=True)]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [(class_names[i], class_names[j], count) for count, i, j in pairs]


def save_most_confused_csv(pairs: list[tuple[str, str, int]], path: str | Path) -> None:
    """most_confused.csv: true, predicted, count; most frequent first."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true", "predicted", "count"])
        writer.writerows(pairs)


def save_top_losses_csv(mistakes: list[Mistake], path: str | Path) -> None:
    """top_losses.csv: rank, file, true, predicted, probability, loss (multi-label: and the worst label's error)."""
    multilabel = any(not np.isnan(m.error) for m in mistakes)
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "index", "file", "true", "predicted", "probability", "loss", *["error"] * multilabel])
        for rank, m in enumerate(mistakes, start=1):
            scores = [f"{m.probability:.6g}", f"{m.loss:.6g}", *([f"{m.error:.6g}"] if multilabel else [])]
            writer.writerow([rank, m.index, m.file, m.true, m.predicted, *scores])


def save_top_losses_png(mistakes: list[Mistake], split, path: str | Path, overlays: list | None = None) -> None:
    """A grid of the top losses, each titled `true / predicted / probability / loss` and its file name (`overlays`:
    heatmaps drawn on the images instead, same order). Images that no longer read are left out."""
    if overlays is None:
        kept, images = readable_images(split, [m.index for m in mistakes])
        shown = [m for m in mistakes if m.index in set(kept.tolist())]
    else:
        shown, images = mistakes, overlays
    plt = pyplot()
    n = max(len(images), 1)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, m in zip(axes.flat, images, shown, strict=False):
        array = np.asarray(image)
        ax.imshow(array, cmap="gray" if array.ndim == 2 else None)
        title = f"{m.true[:14]} / {m.predicted[:14]}\np {m.probability:.2f}  loss {m.loss:.2f}"
        title += f"\n{Path(m.file).name[:22]}"
        ax.set_title(title, fontsize=6.5, color="red" if m.true != m.predicted else "black")
    fig.suptitle("top losses: true / predicted / probability / loss / file", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_mistakes(run_dir: Path, preds, class_names: list[str], split, heatmaps=None) -> list[str]:
    """top_losses.png (without `split`, whose images it shows: not drawn), top_losses.csv and most_confused.csv in
    `run_dir`; `heatmaps` (val --cam): a function of the top losses giving their overlays, drawn as
    top_losses_cam.png. Returns the names of the files written."""
    files = file_names(split) if split is not None else [f"#{i}" for i in range(len(preds))]
    mistakes = top_losses(preds, class_names, files)
    save_top_losses_csv(mistakes, run_dir / TOP_LOSSES_CSV)
    save_most_confused_csv(most_confused(preds, class_names), run_dir / MOST_CONFUSED_CSV)
    if split is None:
        return [TOP_LOSSES_CSV, MOST_CONFUSED_CSV]
    save_top_losses_png(mistakes, split, run_dir / TOP_LOSSES_PNG)
    if heatmaps is None:
        return [TOP_LOSSES_PNG, TOP_LOSSES_CSV, MOST_CONFUSED_CSV]
    save_top_losses_png(mistakes, split, run_dir / TOP_LOSSES_CAM_PNG, heatmaps(mistakes))
    return [TOP_LOSSES_PNG, TOP_LOSSES_CAM_PNG, TOP_LOSSES_CSV, MOST_CONFUSED_CSV]
