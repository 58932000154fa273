"""What the audit writes to its run folder (main process): label_issues.csv, duplicates.csv, outliers.csv, summary.txt
and summary.json, an image grid per issue type, and the wandb tables of the same rows.

label_issues.csv lists files as `trainer train --exclude` reads them (a `file` column), so the audit's list can be
given back to a training run as it is, or after a person went through it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from trainer.audit.issues import Combined, Issues
from trainer.report.evaluation import pyplot, readable_images
from trainer.run.writes import atomic_file

LABEL_ISSUES, DUPLICATES, OUTLIERS = "label_issues.csv", "duplicates.csv", "outliers.csv"
SUMMARY_TXT, SUMMARY_JSON = "summary.txt", "summary.json"
GRID = 16  # images per grid (duplicates: 8 pairs)


class Findings:
    """The issues in words and files: each row named by its file, split, labels and score."""

    def __init__(self, combined: Combined, issues: Issues, files: dict[str, list[str]], splits, class_names):
        self.combined, self.issues, self.files, self.splits, self.names = combined, issues, files, splits, class_names

    def file(self, i: int) -> str:
        return self.files[self.combined.splits[i]][self.combined.rows[i]]

    def split(self, i: int) -> str:
        return str(self.combined.splits[i])

    def given(self, i: int) -> str:
        return self.names[self.combined.labels[i]]

    def label_rows(self) -> list[list]:
        """file, split, given, suggested, score: most likely wrong first."""
        return [
            [self.file(i), self.split(i), self.given(i), self.names[s], f"{score:.6g}"]
            for i, s, score in self.issues.labels
        ]

    def duplicate_rows(self) -> list[list]:
        """file_a, file_b, split_a, split_b, distance: closest first."""
        return [
            [self.file(a), self.file(b), self.split(a), self.split(b), f"{d:.6g}"] for a, b, d in self.issues.duplicates
        ]

    def outlier_rows(self) -> list[list]:
        """file, split, label, score: most unusual first."""
        return [[self.file(i), self.split(i), self.given(i), f"{score:.6g}"] for i, score in self.issues.outliers]

    def leaks(self) -> int:
        return sum(self.split(a) != self.split(b) for a, b, _ in self.issues.duplicates)

    def summary(self, folds: int) -> dict:
        c = self.combined
        return {
            "folds": folds,
            "train_images": int((c.splits == "train").sum()),
            "val_images": int((c.splits == "val").sum()),
            "out_of_sample_top1": float((c.probs.argmax(axis=1) == c.labels).mean()),
            "label_issues": len(self.issues.labels),
            "label_issues_train": sum(self.split(i) == "train" for i, _, _ in self.issues.labels),
            "near_duplicate_pairs": len(self.issues.duplicates),
            "train_val_duplicate_pairs": self.leaks(),
            "outliers": len(self.issues.outliers),
            "rare_classes": {self.names[k]: share for k, share in self.issues.imbalance},
        }

    def summary_lines(self, numbers: dict, run_dir: Path) -> list[str]:
        rare = ", ".join(f"{name} ({share:.1%} of the images)" for name, share in numbers["rare_classes"].items())
        return [
            f"audit: {numbers['folds']} folds, out-of-sample top-1 {numbers['out_of_sample_top1']:.4f} on "
            f"{numbers['train_images']} train + {numbers['val_images']} val images",
            f"  label issues: {numbers['label_issues']} ({numbers['label_issues_train']} in train), most likely first "
            f"in {LABEL_ISSUES}; train without them: trainer train ... --exclude {run_dir / LABEL_ISSUES}",
            f"  near duplicates: {numbers['near_duplicate_pairs']} pairs, {numbers['train_val_duplicate_pairs']} of "
            f"them across train and val (leaks), in {DUPLICATES}",
            f"  outliers: {numbers['outliers']}, in {OUTLIERS}",
            f"  class imbalance: {rare or 'none flagged'}",
            f"Results saved to {run_dir}",
        ]

    def write(self, run_dir: Path, folds: int) -> list[str]:
        """Every file of the audit's findings; returns the summary's lines (printed by the caller)."""
        _csv(run_dir / LABEL_ISSUES, ["file", "split", "given", "suggested", "score"], self.label_rows())
        _csv(run_dir / DUPLICATES, ["file_a", "file_b", "split_a", "split_b", "distance"], self.duplicate_rows())
        _csv(run_dir / OUTLIERS, ["file", "split", "label", "score"], self.outlier_rows())
        numbers = self.summary(folds)
        lines = self.summary_lines(numbers, run_dir)
        with atomic_file(run_dir / SUMMARY_JSON) as tmp, open(tmp, "w") as f:
            json.dump(numbers, f, indent=1)
        with atomic_file(run_dir / SUMMARY_TXT) as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        labels = [(i, f"{self.given(i)} -> {self.names[s]}  {score:.2f}") for i, s, score in self.issues.labels]
        _grid(self._pictures(labels[:GRID]), run_dir / "label_issues.png", "label issues: given -> suggested  score")
        outliers = [(i, f"{self.given(i)}  {score:.2f}") for i, score in self.issues.outliers]
        _grid(self._pictures(outliers[:GRID]), run_dir / "outliers.png", "outliers: label  score")
        pairs = [(i, f"{self.split(i)}  {d:.3f}") for a, b, d in self.issues.duplicates[: GRID // 2] for i in (a, b)]
        _grid(self._pictures(pairs), run_dir / "duplicates.png", "near duplicates, in pairs: split  distance", cols=4)
        return lines

    def _pictures(self, items: list[tuple[int, str]]) -> list[tuple[np.ndarray, str]]:
        """(image, title) of each (index, title) whose image still reads; its file name joins the title."""
        pictures = []
        for i, title in items:
            _, images = readable_images(self.splits[self.split(i)], [self.combined.rows[i]])
            if images:
                pictures.append((np.asarray(images[0]), f"{title}\n{Path(self.file(i)).name[:22]}"))
        return pictures

    def tables(self) -> dict[str, tuple[list[str], list[list]]]:
        """The wandb tables: each issue's rows (the first 200), the image first."""

        def with_images(rows: list[list], indices: list[int]) -> list[list]:  # an unreadable image: no picture
            shown = [self._pictures([(i, "")]) for i in indices[:200]]
            return [[p[0][0] if p else None, *row] for p, row in zip(shown, rows[:200], strict=True)]

        return {
            "audit/label_issues": (
                ["image", "file", "split", "given", "suggested", "score"],
                with_images(self.label_rows(), [i for i, _, _ in self.issues.labels]),
            ),
            "audit/duplicates": (
                ["file_a", "file_b", "split_a", "split_b", "distance"],
                self.duplicate_rows()[:200],
            ),
            "audit/outliers": (
                ["image", "file", "split", "label", "score"],
                with_images(self.outlier_rows(), [i for i, _ in self.issues.outliers]),
            ),
        }


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _grid(pictures: list[tuple[np.ndarray, str]], path: Path, title: str, cols: int | None = None) -> None:
    """A grid of titled images (nothing written when there is none to show)."""
    if not pictures:
        return
    plt = pyplot()
    n = len(pictures)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, pictures, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(caption, fontsize=6.5)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
