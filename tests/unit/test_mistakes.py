"""Top losses and most confused pairs (report.mistakes), the heatmaps' target layers (report.heatmaps), and the
audit's parts that need no training: folds, how the folds' outputs are put together, cleanlab on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.audit.folds import plan_folds
from trainer.audit.issues import combine, find_issues
from trainer.config import UserError
from trainer.report.evaluation import Predictions
from trainer.report.heatmaps import target_layers
from trainer.report.metrics import MultiLabelPredictions
from trainer.report.mistakes import most_confused, top_losses

NAMES = ["cat", "dog", "fox"]


def _preds(labels, predicted, loss) -> Predictions:
    topk = np.array([[p, (p + 1) % 3] for p in predicted])
    probs = np.array([[0.6, 0.3]] * len(labels), dtype=np.float32)
    return Predictions(np.array(labels), topk, np.array(loss, dtype=np.float32), probs)


def test_top_losses_are_the_highest_losses_with_ties_in_dataset_order():
    preds = _preds([0, 1, 2, 0, 1], [1, 1, 0, 2, 0], [2.0, 0.1, 3.0, 2.0, 0.5])
    files = [f"f{i}.png" for i in range(5)]
    found = top_losses(preds, NAMES, files, k=4)
    assert [m.index for m in found] == [2, 0, 3, 4]  # 0 and 3 tie at 2.0: dataset order
    assert (found[0].file, found[0].true, found[0].predicted, found[0].target) == ("f2.png", "fox", "cat", 0)
    assert found[0].probability == pytest.approx(0.6) and found[0].loss == pytest.approx(3.0)


def test_most_confused_counts_each_mistake_once_most_frequent_first():
    preds = _preds([0, 0, 0, 1, 2, 2], [1, 1, 2, 1, 0, 2], [1.0] * 6)
    assert most_confused(preds, NAMES) == [("cat", "dog", 2), ("cat", "fox", 1), ("fox", "cat", 1)]


def test_multilabel_top_losses_and_confusions():
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=np.int8)
    scores = np.array([[0.9, 0.2, 0.1], [0.1, 0.9, 0.8], [0.4, 0.1, 0.6]], dtype=np.float32)
    preds = MultiLabelPredictions(targets, scores, np.array([0.1, 1.5, 0.4], dtype=np.float32))
    worst = top_losses(preds, NAMES, ["a", "b", "c"], k=2)
    assert [m.index for m in worst] == [1, 2]  # |1 - 0.1| = 0.9 for cat in b; |0 - 0.4| for c
    assert (worst[0].true, worst[0].predicted, worst[0].target) == ("cat dog", "dog fox", 0)
    assert worst[0].error == pytest.approx(0.9)
    assert most_confused(preds, NAMES) == [("cat", "fox", 1)]  # b: cat missed while fox was predicted


def test_folds_are_stratified_and_refuse_too_few_images():
    labels = np.repeat([0, 1, 2], [10, 6, 5])
    plan = plan_folds(labels, 5, seed=0, class_names=NAMES)
    for k in range(5):  # each class spread evenly: cat 2 per fold, dog 1 or 2, fox 1
        counts = np.bincount(labels[plan.held(k)], minlength=3)
        assert counts[0] == 2 and counts[1] in (1, 2) and counts[2] == 1
    assert sorted(np.concatenate([plan.held(k) for k in range(5)]).tolist()) == list(range(21))
    with pytest.raises(UserError, match=r"--folds 6: every class needs at least 6 .* fox \(5\) has fewer"):
        plan_folds(labels, 6, seed=0, class_names=NAMES)
    with pytest.raises(UserError, match="--folds 1: cross-validation needs at least 2 folds"):
        plan_folds(labels, 1, seed=0, class_names=NAMES)


def test_each_training_image_takes_the_probabilities_of_the_fold_that_held_it_out():
    fold_of = np.array([0, 1, 0, 1])
    outputs = [
        {
            "train_probs": np.full((4, 2), [k, 1 - k], dtype=np.float32),
            "val_probs": np.full((2, 2), [0.2 * (k + 1), 1 - 0.2 * (k + 1)], dtype=np.float32),
            "train_embeddings": np.eye(3, dtype=np.float32)[[0, 1, 2, 0]] if k else np.full((4, 3), 3**-0.5),
            "val_embeddings": np.ones((2, 3), np.float32) / np.sqrt(3),
        }
        for k in range(2)
    ]
    combined = combine(fold_of, outputs, np.array([0, 1, 0, 1]), np.array([1, 0]))
    assert combined.probs[:4, 0].tolist() == [0, 1, 0, 1]  # fold 0's model for rows 0 and 2
    assert combined.probs[4:, 0] == pytest.approx([0.3, 0.3])  # val: the mean of both
    assert combined.features.shape == (6, 6)
    assert np.linalg.norm(combined.features, axis=1) == pytest.approx(np.ones(6), abs=1e-6)
    assert combined.splits.tolist() == ["train"] * 4 + ["val"] * 2 and combined.rows.tolist() == [0, 1, 2, 3, 0, 1]


def test_cleanlab_finds_a_swapped_label_and_an_exact_copy():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    centres = np.eye(3, 16) * 4
    features = centres[labels] + rng.normal(size=(120, 16))
    features[7] = features[50]  # an exact copy
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    probs = np.full((120, 3), 0.05, dtype=np.float32)
    probs[np.arange(120), labels] = 0.9
    given = labels.copy()
    given[3] = 2  # filed under the wrong class; the model says 0
    combined = combine(
        np.zeros(120, dtype=np.int64),
        [{"train_probs": probs, "val_probs": probs[:0], "train_embeddings": features, "val_embeddings": features[:0]}],
        given,
        given[:0],
    )
    issues = find_issues(combined)
    assert issues.labels[0][:2] == (3, 0)
    assert issues.duplicates[0][:2] == (7, 50) and issues.duplicates[0][2] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("model_name", "layer"), [("test_resnet", "layer3"), ("test_convnext", "stages.2"), ("test_vit", "blocks.5.norm1")]
)
def test_cam_target_layers(model_name, layer):
    import timm

    kwargs = {"img_size": 32} if "vit" in model_name else {}
    model = timm.create_model(model_name, num_classes=3, in_chans=1, **kwargs).eval()
    layers, reshape = target_layers(model, model_name, 32, 1)
    assert layers[0] is model.get_submodule(layer)  # the last stage with a map of 2x2 or more at 32 px
    if reshape is not None:  # ViT: the class token dropped, 4 patch tokens as a 2x2 grid
        tokens = torch.arange(5 * 8, dtype=torch.float32).reshape(1, 5, 8)
        grid = reshape(tokens)
        assert grid.shape == (1, 8, 2, 2) and torch.equal(grid[0, :, 0, 0], tokens[0, 1])


def test_cam_refuses_a_model_without_a_spatial_map():
    import timm

    model = timm.create_model("test_mambaout", num_classes=3, in_chans=1).eval()
    with pytest.raises(UserError, match="--cam: test_mambaout has no stage with a spatial map"):
        target_layers(model, "test_mambaout", 32, 1)
