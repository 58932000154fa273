"""The folds put together, and what cleanlab finds in them: label issues, near duplicates (within a split and across
train and val: leaks), outliers, class imbalance.

Out-of-sample throughout: a training image's probabilities come from the one fold model that did not train on it; a
validation image's, which no fold trained on, are the mean of the K models'. Embeddings: each fold model's
L2-normalised `pre_logits`, the K of them concatenated (scaled to unit length): the fold models' spaces are not
aligned, so they are put side by side, not averaged; an exact copy is at distance 0 in every one of them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from trainer.config import UserError

EXTRA = "inspect"  # the pyproject extra that installs cleanlab
ISSUE_TYPES = ("label", "near_duplicate", "outlier", "class_imbalance")


def cleanlab_module():
    """cleanlab, or one line naming the extra that installs it."""
    try:
        import cleanlab
    except ImportError:
        raise UserError(f'trainer data audit needs cleanlab: pip install -e ".[{EXTRA}]"') from None
    return cleanlab


@dataclass(frozen=True)
class Combined:
    """Every image of train then val: given labels, out-of-sample probabilities, embeddings, split and row."""

    labels: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, C) float32
    features: np.ndarray  # (N, K*D) float32, unit rows
    splits: np.ndarray  # (N,) "train" | "val"
    rows: np.ndarray  # (N,) the row in its split


def combine(fold_of: np.ndarray, outputs: list[dict[str, np.ndarray]], train_labels, val_labels) -> Combined:
    """The K folds' outputs as one out-of-sample set (see the module docstring)."""
    n_train, n_val, folds = len(train_labels), len(val_labels), len(outputs)
    train_probs = np.empty_like(outputs[0]["train_probs"])
    for k, out in enumerate(outputs):
        held = fold_of == k
        train_probs[held] = out["train_probs"][held]
    val_probs = np.mean([out["val_probs"] for out in outputs], axis=0)
    features = np.concatenate(
        [np.concatenate([out["train_embeddings"], out["val_embeddings"]]) for out in outputs], axis=1
    ) / np.sqrt(folds)
    return Combined(
        labels=np.concatenate([train_labels, val_labels]).astype(np.int64),
        probs=np.concatenate([train_probs, val_probs]).astype(np.float32),
        features=features.astype(np.float32),
        splits=np.array(["train"] * n_train + ["val"] * n_val),
        rows=np.concatenate([np.arange(n_train), np.arange(n_val)]),
    )


@dataclass(frozen=True)
class Issues:
    """cleanlab's findings as plain rows, most likely first; indices into `Combined`."""

    labels: list[tuple[int, int, float]]  # (index, suggested class, label quality score: low = likely wrong)
    duplicates: list[tuple[int, int, float]]  # (index a, index b, cosine distance), a < b
    outliers: list[tuple[int, float]]  # (index, outlier score: low = unusual)
    imbalance: list[tuple[int, float]]  # (class, its share of the images) of the classes cleanlab flags as rare
    label_scores: np.ndarray  # (N,) every image's label quality score (for benchmarks: ranking by it)


def find_issues(combined: Combined) -> Issues:
    """cleanlab's Datalab on the probabilities and embeddings: label, near_duplicate, outlier, class_imbalance."""
    cleanlab_module()
    from cleanlab import Datalab

    lab = Datalab(data={"label": combined.labels}, label_name="label", verbosity=0)
    with warnings.catch_warnings():  # cleanlab's own pandas deprecations: nothing the user can act on
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        lab.find_issues(pred_probs=combined.probs, features=combined.features, issue_types={t: {} for t in ISSUE_TYPES})
    label = lab.get_issues("label")
    flagged = np.flatnonzero(label["is_label_issue"].to_numpy())
    scores = label["label_score"].to_numpy()
    suggested = label["predicted_label"].to_numpy()
    labels = sorted(((int(i), int(suggested[i]), float(scores[i])) for i in flagged), key=lambda r: (r[2], r[0]))
    near = lab.get_issues("near_duplicate")
    pairs = set()
    for i in np.flatnonzero(near["is_near_duplicate_issue"].to_numpy()):
        for j in near["near_duplicate_sets"].iloc[i]:
            pairs.add((min(int(i), int(j)), max(int(i), int(j))))
    features = combined.features
    duplicates = sorted(
        ((a, b, max(0.0, float(1.0 - features[a] @ features[b]))) for a, b in pairs), key=lambda r: (r[2], r[0], r[1])
    )
    outlier = lab.get_issues("outlier")
    outlier_scores = outlier["outlier_score"].to_numpy()
    outliers = sorted(
        ((int(i), float(outlier_scores[i])) for i in np.flatnonzero(outlier["is_outlier_issue"].to_numpy())),
        key=lambda r: (r[1], r[0]),
    )
    rare = lab.get_issues("class_imbalance")
    shares = np.bincount(combined.labels, minlength=combined.probs.shape[1]) / len(combined.labels)
    rare_classes = sorted({int(c) for c in combined.labels[rare["is_class_imbalance_issue"].to_numpy()]})
    imbalance = [(c, float(shares[c])) for c in rare_classes]
    return Issues(labels, duplicates, outliers, imbalance, scores)
