"""Evaluation reports: per-class accuracy tables and the confusion matrix, from gathered validation predictions.

Pure functions on numpy arrays, no rank logic: callers decide who writes (the main process, see reporter.py).
Files are written under a temporary name, then renamed into place.
matplotlib is imported lazily with the headless Agg backend, so importing this module costs nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.decode import UnreadableImage, decode_image
from trainer.data.samples import Replacement
from trainer.report.metrics import calibration, precision_recall_curves, single_label_scores
from trainer.run.writes import atomic_file

TABLE_COLUMNS = ("class", "images", "top1", "top5")


@dataclass
class Predictions:
    """Predictions for a whole evaluation set, one row per sample in dataset order."""

    labels: np.ndarray
    """(N,) int64 true class."""
    topk: np.ndarray
    """(N, k) int64 class indices, best first."""
    loss: np.ndarray
    """(N,) float32 per-sample loss."""
    probs: np.ndarray | None = None
    """(N, k) float32 softmax probabilities of the `topk` classes, when recorded."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def predicted(self) -> np.ndarray:
        """(N,) top-1 class."""
        return self.topk[:, 0]


def per_class_rows(preds: Predictions, class_names: list[str]) -> list[dict]:
    """Images, top-1 and top-k accuracy, precision, recall and F1 (of the top-1 prediction) per true class, then an
    `all` row (its precision/recall/F1 are the macro averages); `top5` means top-k, k = topk.shape[1]."""
    hit1 = preds.topk[:, 0] == preds.labels
    hitk = (preds.topk == preds.labels[:, None]).any(axis=1)
    scores = single_label_scores(preds.labels, preds.predicted, len(class_names))
    rows = []
    for index, name in enumerate(class_names):
        mine = preds.labels == index
        n = int(mine.sum())
        rows.append(
            {
                "class": name,
                "images": n,
                "top1": float(hit1[mine].mean()) if n else 0.0,
                "top5": float(hitk[mine].mean()) if n else 0.0,
                **{key: float(scores[key][index]) for key in ("precision", "recall", "f1")},
            }
        )
    n = len(preds.labels)
    rows.append(
        {
            "class": "all",
            "images": n,
            "top1": float(hit1.mean()) if n else 0.0,
            "top5": float(hitk.mean()) if n else 0.0,
            **{key: float(scores[key].mean()) for key in ("precision", "recall", "f1")},
        }
    )
    return rows


HEADERS = {"top1": "top1_acc", "top5": "top5_acc", "ap": "AP"}


def format_per_class(rows: list[dict]) -> str:
    """The YOLOv5-style table: one right-aligned line per class, `all` first as the headline; the columns are
    the rows' (single-label: top-1/top-5 accuracy, precision, recall, F1; multi-label: AP, precision, recall, F1)."""
    width = max(12, *(len(str(r["class"])) for r in rows))
    columns = [c for c in rows[0] if c not in ("class", "images")] if rows else []
    header = f"{'Class':>{width}} {'Images':>10}" + "".join(f" {HEADERS.get(c, c):>10}" for c in columns)
    ordered = [rows[-1], *rows[:-1]] if rows and rows[-1]["class"] == "all" else rows
    lines = [header]
    for r in ordered:
        lines.append(f"{r['class']!s:>{width}} {r['images']:>10d}" + "".join(f" {r[c]:>10.3f}" for c in columns))
    return "\n".join(lines)


def save_per_class_csv(rows: list[dict], path: str | Path) -> None:
    """Write the per-class rows as CSV (class, images, then the metric columns), `all` last."""
    columns = list(rows[0]) if rows else list(TABLE_COLUMNS)
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([r["class"], r["images"], *(f"{r[c]:.6g}" for c in columns[2:])])


def confusion_matrix(preds: Predictions, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: rows are true classes, columns top-1 predictions."""
    flat = preds.labels.astype(np.int64) * num_classes + preds.topk[:, 0].astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_confusion_matrix_png(cm: np.ndarray, class_names: list[str], path: str | Path) -> None:
    """The confusion matrix normalised per true class (rows sum to 1), class names on both axes."""
    plt = pyplot()
    counts = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, counts, out=np.zeros(cm.shape, dtype=float), where=counts > 0)
    n = len(class_names)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=100)
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    # Tick labels stop being readable beyond ~60 classes; the picture still shows where the mass sits.
    if n <= 60:
        ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 10 else 0, fontsize=8)
        ax.set_yticks(range(n), labels=class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if normalised[i, j] >= 0.005:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (normalised per true class)")
    fig.tight_layout()
    with atomic_file(path) as tmp:  # a full disk keeps the previous picture, never a torn one
        fig.savefig(tmp)
    plt.close(fig)


def sample_indices(preds: Predictions, n: int) -> np.ndarray:
    """Up to n samples to show: half spread evenly over the set (sorted sets show every class), half mistakes."""
    spread = np.unique(np.linspace(0, len(preds) - 1, num=min(n - n // 2, len(preds))).round().astype(np.int64))
    wrong = np.flatnonzero(preds.predicted != preds.labels)
    wrong = wrong[~np.isin(wrong, spread)][: n - len(spread)]
    return np.sort(np.concatenate([spread, wrong]))


def save_prediction_grid(
    images: list, labels: np.ndarray, predicted: np.ndarray, class_names: list[str], path: str | Path
) -> None:
    """A grid of images titled `true -> predicted`, mistakes in red (YOLOv5's val_batch_pred, for classifiers)."""
    plt = pyplot()
    n = len(images)
    cols = int(np.ceil(np.sqrt(n))) or 1
    rows = int(np.ceil(n / cols)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, true, pred in zip(axes.flat, images, labels, predicted, strict=False):
        array = np.asarray(image)
        ax.imshow(array, cmap="gray" if array.ndim == 2 else None)
        ax.set_title(
            f"{class_names[true]} -> {class_names[pred]}", fontsize=7, color="black" if true == pred else "red"
        )
    fig.suptitle("validation: true -> predicted", fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def save_results_png(results_csv: str | Path, path: str | Path) -> None:
    """Curves of results.csv by epoch: losses, accuracies and learning rate (whatever columns the file has)."""
    with open(results_csv) as f:
        table = list(csv.DictReader(f))
    if not table:
        return
    epochs = [float(r["epoch"]) for r in table]
    columns = [c for c in table[0] if c != "epoch"]
    panels = {
        "loss": [c for c in columns if "loss" in c],
        "accuracy": [c for c in columns if any(k in c for k in ("top", "f1", "acc", "map"))],
        "learning rate": [c for c in columns if c.endswith("lr")],
    }
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    for ax, (title, names) in zip(axes, panels.items(), strict=True):
        for name in names:
            values = [float(r[name]) if r[name] not in ("", None) else np.nan for r in table]
            ax.plot(epochs, values, marker="." if len(epochs) < 30 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def save_reliability_png(preds: Predictions, path: str | Path) -> float:
    """The reliability diagram of the top-1 probability (accuracy per confidence bin against the diagonal);
    returns the expected calibration error it shows."""
    confidence = preds.probs[:, 0].astype(np.float64)
    ece, bins = calibration(confidence, preds.predicted == preds.labels)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    centres = (np.arange(len(bins)) + 0.5) / len(bins)
    filled = bins[:, 2] > 0
    ax.bar(centres[filled], bins[filled, 1], width=1 / len(bins), edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.4f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return ece


def save_pr_curves_png(preds, class_names: list[str], path: str | Path, shown: int = 20) -> None:
    """Precision-recall curves of a multi-label set, one per class (the first `shown` with positives)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    drawn = 0
    for name, (recall, precision) in zip(class_names, precision_recall_curves(preds), strict=True):
        if len(recall) and drawn < shown:
            ax.plot(recall, precision, linewidth=1, label=name)
            drawn += 1
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall per class")
    if drawn <= 20:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def readable_images(val_split, index):
    """The validation images at `index` that still read, and their indices. One that became unreadable after the scan
    is left out of the picture and reported as training reports it (samples.Replacement's warning): a neighbour in
    its place would show another image under this one's prediction."""
    replacement = Replacement(where="the validation images drawn at the end")
    kept, images = [], []
    for i in index:
        try:
            images.append(decode_image(val_split[int(i)]["image"]))
            kept.append(i)
        except UnreadableImage as e:
            replacement.warn(e.path, e.reason)
    return np.asarray(kept, dtype=np.int64), images
