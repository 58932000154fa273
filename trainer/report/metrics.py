"""Metrics of gathered validation predictions, computed with scikit-learn: macro-F1, balanced accuracy, per-class
precision/recall/F1 and the expected calibration error for single-label runs; mAP, micro/macro F1 and per-class
AP/precision/recall/F1 for multi-label runs (`MultiLabelPredictions`).

Pure functions on numpy arrays of the whole set (every rank holds it after gather_for_metrics), so the numbers are
those of one process at any process count. scikit-learn is imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
MULTI_LABEL_COLUMNS = ("class", "images", "ap", "precision", "recall", "f1")


@dataclass
class MultiLabelPredictions:
    """A multi-label evaluation set's predictions, one row per sample in dataset order."""

    targets: np.ndarray
    """(N, C) int8 multi-hot truth."""
    scores: np.ndarray
    """(N, C) float32 per-label sigmoid probabilities."""
    loss: np.ndarray
    """(N,) float32 per-sample loss (BCE averaged over labels)."""
    threshold: float = 0.5

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def predicted(self) -> np.ndarray:
        """(N, C) bool: the labels above the threshold."""
        return self.scores > self.threshold


# ---- single-label -----------------------------------------------------------------------------------------------


def single_label_scores(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support of top-1 predictions (0 where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(num_classes), zero_division=0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def single_label_metrics(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, float]:
    """val/macro_f1 (over every class) and val/balanced_acc (mean recall over classes with images)."""
    scores = single_label_scores(labels, predicted, num_classes)
    present = scores["support"] > 0
    return {
        "val/macro_f1": float(scores["f1"].mean()),
        "val/balanced_acc": float(scores["recall"][present].mean()) if present.any() else 0.0,
    }


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS):
    """(ECE, per-bin (mean confidence, accuracy, count)) over equal-width confidence bins of the top-1 probability."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    hit_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    safe = np.maximum(count, 1)
    mean_conf, accuracy = conf_sum / safe, hit_sum / safe
    ece = float((count * np.abs(mean_conf - accuracy)).sum() / max(count.sum(), 1))
    return ece, np.stack([mean_conf, accuracy, count], axis=1)


# ---- multi-label ------------------------------------------------------------------------------------------------


def average_precisions(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AP per class (NaN for a class without positives in the set)."""
    from sklearn.metrics import average_precision_score

    aps = np.full(targets.shape[1], np.nan)
    for c in np.flatnonzero(targets.sum(axis=0) > 0):
        aps[c] = average_precision_score(targets[:, c], scores[:, c])
    return aps


def multilabel_metrics(preds: MultiLabelPredictions) -> dict[str, float]:
    """val/map (macro over classes with positives), val/micro_f1 and val/macro_f1 at the threshold, val/loss."""
    from sklearn.metrics import f1_score

    aps = average_precisions(preds.targets, preds.scores)
    predicted = preds.predicted.astype(np.int8)
    return {
        "val/loss": float(preds.loss.astype(np.float64).mean()),
        "val/map": float(np.nanmean(aps)) if np.isfinite(aps).any() else 0.0,
        "val/micro_f1": float(f1_score(preds.targets, predicted, average="micro", zero_division=0)),
        "val/macro_f1": float(f1_score(preds.targets, predicted, average="macro", zero_division=0)),
    }


def multilabel_rows(preds: MultiLabelPredictions, class_names: list[str]) -> list[dict]:
    """Per class: images with the label, AP, precision, recall, F1 at the threshold; then `all` (mAP, micro P/R/F1)."""
    from sklearn.metrics import precision_recall_fscore_support

    aps = average_precisions(preds.targets, preds.scores)
    predicted = preds.predicted.astype(np.int8)
    precision, recall, f1, support = precision_recall_fscore_support(
        preds.targets, predicted, average=None, zero_division=0
    )
    rows = [
        {
            "class": name,
            "images": int(support[c]),
            "ap": float(aps[c]) if np.isfinite(aps[c]) else 0.0,
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
        }
        for c, name in enumerate(class_names)
    ]
    micro = precision_recall_fscore_support(preds.targets, predicted, average="micro", zero_division=0)
    rows.append(
        {
            "class": "all",
            "images": len(preds),
            "ap": float(np.nanmean(aps)) if np.isfinite(aps).any() else 0.0,
            "precision": float(micro[0]),
            "recall": float(micro[1]),
            "f1": float(micro[2]),
        }
    )
    return rows


def precision_recall_curves(preds: MultiLabelPredictions) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class (recall, precision) of its precision-recall curve; empty arrays for a class without positives."""
    from sklearn.metrics import precision_recall_curve

    curves = []
    for c in range(preds.targets.shape[1]):
        if preds.targets[:, c].any():
            precision, recall, _ = precision_recall_curve(preds.targets[:, c], preds.scores[:, c])
            curves.append((recall, precision))
        else:
            curves.append((np.zeros(0), np.zeros(0)))
    return curves
