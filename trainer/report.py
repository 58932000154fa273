"""Evaluation reports: per-class accuracy tables and the confusion matrix, from gathered validation predictions.

Pure functions on numpy arrays, no rank logic: callers decide who writes (the main process, see tracking.py).
matplotlib is imported lazily with the headless Agg backend, so importing this module costs nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    """Images, top-1 and top-k accuracy per true class, then an `all` row; `top5` means top-k, k = topk.shape[1]."""
    hit1 = preds.topk[:, 0] == preds.labels
    hitk = (preds.topk == preds.labels[:, None]).any(axis=1)
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
            }
        )
    n = len(preds.labels)
    rows.append(
        {
            "class": "all",
            "images": n,
            "top1": float(hit1.mean()) if n else 0.0,
            "top5": float(hitk.mean()) if n else 0.0,
        }
    )
    return rows


def format_per_class(rows: list[dict]) -> str:
    """The YOLOv5-style table: one right-aligned line per class, `all` first as the headline."""
    width = max(12, *(len(str(r["class"])) for r in rows))
    header = f"{'Class':>{width}} {'Images':>10} {'top1_acc':>10} {'top5_acc':>10}"
    ordered = [rows[-1], *rows[:-1]] if rows and rows[-1]["class"] == "all" else rows
    lines = [header]
    for r in ordered:
        lines.append(f"{r['class']!s:>{width}} {r['images']:>10d} {r['top1']:>10.3f} {r['top5']:>10.3f}")
    return "\n".join(lines)


def save_per_class_csv(rows: list[dict], path: str | Path) -> None:
    """Write the per-class rows (class, images, top1, top5) as CSV, `all` last."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        for r in rows:
            writer.writerow([r["class"], r["images"], f"{r['top1']:.6g}", f"{r['top5']:.6g}"])


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
    fig.savefig(path)
    plt.close(fig)
