"""Per-class tables and confusion matrices on small hand-made predictions."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from trainer.report.evaluation import (
    Predictions,
    confusion_matrix,
    format_per_class,
    per_class_rows,
    sample_indices,
    save_confusion_matrix_png,
    save_per_class_csv,
    save_prediction_grid,
    save_results_png,
)

NAMES = ["cat", "dog", "bird"]


def _preds() -> Predictions:
    # 6 samples: cat x3 (2 right), dog x2 (1 right, the other has dog second), bird x1 (wrong, bird not in top-2).
    labels = np.array([0, 0, 0, 1, 1, 2])
    topk = np.array([[0, 1], [0, 2], [1, 0], [1, 0], [0, 1], [0, 1]])
    return Predictions(labels=labels, topk=topk, loss=np.linspace(0.1, 0.6, 6, dtype=np.float32))


def test_per_class_rows_count_and_accuracy():
    rows = per_class_rows(_preds(), NAMES)
    assert [r["class"] for r in rows] == [*NAMES, "all"]
    assert [r["images"] for r in rows] == [3, 2, 1, 6]
    assert sum(r["images"] for r in rows[:-1]) == rows[-1]["images"]
    assert [r["top1"] for r in rows] == pytest.approx([2 / 3, 1 / 2, 0.0, 3 / 6])
    # top5 is top-k with k = 2 here.
    assert [r["top5"] for r in rows] == pytest.approx([1.0, 1.0, 0.0, 5 / 6])


def test_class_without_images_has_zero_count_not_nan():
    preds = _preds()
    rows = per_class_rows(preds, [*NAMES, "fish"])
    fish = rows[3]
    assert fish == {"class": "fish", "images": 0, "top1": 0.0, "top5": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_per_class_precision_recall_f1_by_hand():
    # top-1 predictions cat, cat, dog, dog, cat, cat: cat 2 of 4 predicted right (precision 1/2) and 2 of 3 found.
    rows = per_class_rows(_preds(), NAMES)
    assert [r["precision"] for r in rows[:3]] == pytest.approx([1 / 2, 1 / 2, 0.0])
    assert [r["recall"] for r in rows[:3]] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert rows[0]["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert rows[-1]["recall"] == pytest.approx((2 / 3 + 1 / 2) / 3)  # the `all` row: macro averages


def test_format_per_class_puts_all_first_and_lists_every_class():
    text = format_per_class(per_class_rows(_preds(), NAMES))
    lines = text.splitlines()
    assert lines[0].split() == ["Class", "Images", "top1_acc", "top5_acc", "precision", "recall", "f1"]
    assert lines[1].split() == ["all", "6", "0.500", "0.833", "0.333", "0.389", "0.357"]
    assert [line.split()[0] for line in lines[2:]] == NAMES
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_save_per_class_csv_round_trips(tmp_path):
    rows = per_class_rows(_preds(), NAMES)
    path = tmp_path / "per_class.csv"
    save_per_class_csv(rows, path)
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert [r["class"] for r in read] == [*NAMES, "all"]
    assert [int(r["images"]) for r in read] == [3, 2, 1, 6]
    assert float(read[0]["top1"]) == pytest.approx(2 / 3, rel=1e-5)


def test_confusion_matrix_rows_true_cols_predicted():
    cm = confusion_matrix(_preds(), 3)
    expected = np.array([[2, 1, 0], [1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 6


def test_confusion_matrix_png_is_a_real_image(tmp_path):
    from PIL import Image

    path = tmp_path / "confusion_matrix.png"
    names = [f"class_{i}" for i in range(12)]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 200)
    preds = Predictions(labels=labels, topk=labels[:, None].copy(), loss=np.zeros(200, np.float32))
    save_confusion_matrix_png(confusion_matrix(preds, 12), names, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 400
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # drawn, not blank


def _png(path, min_width: int, min_height: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        return np.asarray(image.convert("L"))


def test_results_png_plots_every_column(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(
        "epoch,train/loss,val/loss,val/top1,val/top5,lr\n1,2.0,1.5,0.4,0.8,0.01\n2,1.0,0.9,0.7,0.95,0.005\n"
    )
    save_results_png(csv_path, tmp_path / "results.png")
    assert _png(tmp_path / "results.png", 800, 300).std() > 10


def test_sample_indices_spread_over_the_set_and_include_mistakes():
    labels = np.repeat(np.arange(10), 10)  # sorted by class, as folder datasets often are
    predicted = labels.copy()
    predicted[[5, 6, 7]] = 9  # three mistakes, all in class 0
    preds = Predictions(labels=labels, topk=predicted[:, None], loss=np.zeros(100, np.float32))
    index = sample_indices(preds, 20)
    assert len(index) == 13 and len(set(index.tolist())) == 13 and (np.diff(index) > 0).all()
    assert set(labels[index]) == set(range(10))  # every class shown
    assert {5, 6, 7} <= set(index.tolist())  # and every mistake, while there is room


def test_prediction_grid_is_a_real_image(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8), dtype=np.uint8) for _ in range(7)]
    labels, predicted = np.arange(7) % 3, np.array([0, 1, 2, 0, 0, 2, 0])
    save_prediction_grid(images, labels, predicted, NAMES, tmp_path / "grid.png")
    assert _png(tmp_path / "grid.png", 300, 300).std() > 10
