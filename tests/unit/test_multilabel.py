"""Multi-label data, tasks and metrics: list columns become multi-hot rows, the loss is one call, metrics agree with
scikit-learn computed independently on the same gathered predictions, and "best" is one comparison."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score

from trainer.config import DataConfig, TrainConfig, UserError
from trainer.data.splits import label_counts, load_splits
from trainer.data.transforms import ImageTransform, Preprocess, train_mixup
from trainer.report.metrics import (
    MultiLabelPredictions,
    calibration,
    multilabel_metrics,
    multilabel_rows,
    single_label_metrics,
)
from trainer.run.checkpointer import TrainState
from trainer.train.tasks import Best, build_task, restore_best

NAMES = ["cat", "dog", "ball", "tree"]
PRE = Preprocess(8, 1, (0.5,), (0.5,), "bilinear", 1.0)


def _saved(tmp_path, rows):
    tags = datasets.Sequence(datasets.ClassLabel(names=NAMES))
    features = datasets.Features({"image": datasets.Image(), "tags": tags})
    images = [np.full((8, 8), 20 * i, np.uint8) for i in range(len(rows))]
    datasets.Dataset.from_dict({"image": images, "tags": rows}, features=features).save_to_disk(str(tmp_path / "s"))
    return str(tmp_path / "s")


def test_sequence_classlabel_becomes_multi_hot_and_collates_float(tmp_path):
    rows = [[0, 1], [2], [1, 2, 3], [0], [3], [0, 2], [1], [2, 3], [0, 1, 2, 3], [1, 3]]
    splits, info = load_splits(DataConfig(data=_saved(tmp_path, rows), val_fraction=0.2))
    assert info.multilabel and info.class_names == NAMES and info.task == "multilabel"
    assert "at random" in info.val_split  # a multi-label row has no class to stratify by
    both = label_counts(splits["train"], info) + label_counts(splits["val"], info)
    assert both.tolist() == [4, 5, 5, 5]  # positives per class over train + val: every row kept once
    tf = ImageTransform(PRE, False)
    examples = [{"image": torch.zeros(1, 8, 8), "label": r["label"]} for r in splits["train"]]
    batch = tf.collate(examples)
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (len(examples), 4)
    assert batch.labels.sum().item() == label_counts(splits["train"], info).sum()


def test_task_multiclass_refuses_lists_and_multilabel_refuses_single(tmp_path):
    path = _saved(tmp_path, [[0, 1], [2], [1], [3]] * 3)
    with pytest.raises(UserError, match="--task multiclass, but its labels are lists"):
        load_splits(DataConfig(data=path, task="multiclass"))
    with pytest.raises(UserError, match="--task multilabel, but it has one label per image"):
        load_splits(DataConfig(data="digits", task="multilabel"))


def test_mixup_mixes_multi_hot_rows():
    from trainer.data.splits import DataInfo

    info = DataInfo(NAMES, 1, 10, 2, "x", 0.0, multilabel=True)
    mixup = train_mixup(DataConfig(mixup=0.4), info, 4)
    targets = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    torch.manual_seed(0)
    _, mixed = mixup(torch.zeros(4, 1, 8, 8), targets.clone())
    lam = 1 - mixed[0, 1].item()  # row 0 (no dog) mixed with row 3 (all labels): the batch flipped
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * targets + (1 - lam) * targets.flip(0))


def test_bce_loss_smoothing_and_pos_weight_match_torch():
    counts = np.array([50, 5, 20, 25])
    task = build_task(TrainConfig(label_smoothing=0.2, class_weights="inv_freq"), True, 4, counts)
    logits, targets = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    smoothed = targets * 0.8 + 0.1
    expected = F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=task.pos_weight)
    torch.testing.assert_close(task.loss(logits, targets), expected)
    assert task.pos_weight.argmax().item() == 1  # the rarest label's positives weigh most
    assert task.best == Best("val/map", "max") and task.loss_name == "bce"
    asl = build_task(TrainConfig(loss="asl"), True, 4)
    assert torch.isfinite(asl.loss(logits, targets))


def test_single_label_class_weights_follow_timm_inverse_frequency():
    task = build_task(TrainConfig(class_weights="inv_freq", label_smoothing=0.0), False, 3, np.array([80, 10, 10]))
    weights = 1 / np.array([80, 10, 10])
    np.testing.assert_allclose(task.class_weight.numpy(), weights / weights.mean(), rtol=1e-6)
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    torch.testing.assert_close(task.loss(logits, labels), F.cross_entropy(logits, labels, weight=task.class_weight))


def test_multilabel_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 5)) < 0.3).astype(np.int8)
    targets[:, 4] = 0  # a class without positives: left out of the mAP
    scores = np.clip(targets * 0.4 + rng.random((200, 5)) * 0.6, 0, 1).astype(np.float32)
    preds = MultiLabelPredictions(targets, scores, np.ones(200, np.float32), threshold=0.5)
    got = multilabel_metrics(preds)
    expected_map = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(4)])
    assert got["val/map"] == pytest.approx(expected_map, rel=1e-9)
    predicted = (scores > 0.5).astype(np.int8)
    assert got["val/micro_f1"] == pytest.approx(f1_score(targets, predicted, average="micro"), rel=1e-9)
    assert got["val/macro_f1"] == pytest.approx(f1_score(targets, predicted, average="macro", zero_division=0))
    rows = multilabel_rows(preds, [*NAMES, "none"])
    assert [r["images"] for r in rows[:-1]] == targets.sum(axis=0).tolist()
    assert rows[2]["ap"] == pytest.approx(average_precision_score(targets[:, 2], scores[:, 2]))
    assert rows[-1]["ap"] == pytest.approx(expected_map)


def test_single_label_metrics_agree_with_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 300)
    labels[labels == 5] = 4  # class 5 has no images but is predicted sometimes
    predicted = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 6, 300))
    got = single_label_metrics(labels, predicted, 6)
    with pytest.warns(UserWarning):  # sklearn warns about the class only predicted; the value is the same
        balanced = balanced_accuracy_score(labels, predicted)
    assert got["val/balanced_acc"] == pytest.approx(balanced, rel=1e-9)
    macro = f1_score(labels, predicted, labels=range(6), average="macro", zero_division=0)
    assert got["val/macro_f1"] == pytest.approx(macro, rel=1e-9)


def test_expected_calibration_error_by_hand():
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.55, 0.15])
    correct = np.array([1, 0, 1, 1, 1, 0])
    ece, bins = calibration(confidence, correct, bins=10)
    # bins: 0.95 (acc 0.5, gap 0.45, 2 of 6), 0.55 (acc 1, gap 0.45, 3 of 6), 0.15 (acc 0, gap 0.15, 1 of 6)
    assert ece == pytest.approx((2 * 0.45 + 3 * 0.45 + 1 * 0.15) / 6)
    assert bins[:, 2].sum() == 6


def test_best_is_one_comparison_and_old_checkpoints_keep_their_best():
    assert Best("val/loss", "min").better(0.2, 0.3) and not Best("val/loss", "min").better(0.4, 0.3)
    assert Best().better(0.1, None) and Best().plateau_value(0.5) == 0.5 == -Best("val/loss", "min").plateau_value(0.5)
    old = TrainState(**{"epoch": 3, "best_top1": 0.8, "best_epoch": 2})  # written before best_value existed
    restore_best(old, Best())
    assert old.best_value == 0.8 and not Best().better(0.79, old.best_value)
    other = TrainState(best_value=0.5, best_metric="val/top1")
    restore_best(other, Best("val/macro_f1", "max"))  # resumed with another --best-metric: starts over
    assert other.best_value is None


@pytest.mark.parametrize(
    ("options", "multilabel", "message"),
    [
        (dict(loss="ce"), True, "--loss ce is single-label"),
        (dict(best_metric="top1"), True, "--best-metric top1 is single-label"),
        (dict(loss="bce"), False, "--loss bce is for multi-label data"),
    ],
)
def test_task_options_that_do_not_fit_the_data_are_refused(options, multilabel, message):
    with pytest.raises(UserError, match=message):
        build_task(TrainConfig(**options), multilabel, 4)


def test_balanced_sampler_draws_inverse_frequency_seeded_by_epoch_with_equal_rank_steps():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from trainer.data.samples import BalancedSampler

    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    weights = 1.0 / np.bincount(labels)[labels]
    sampler = BalancedSampler(weights, seed=3)
    sampler.set_epoch(1)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(2)
    assert first == again != list(sampler)  # a resumed epoch draws the same samples; the next epoch others
    share = np.bincount(labels[first], minlength=3) / len(first)
    assert np.all(np.abs(share - 1 / 3) < 0.06), share  # each class about a third, the rarest included
    sampler.set_epoch(1)
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 32, drop_last=True), 2, rank)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 1000 // 32 // 2
    whole = list(BatchSampler(first, 32, drop_last=True))
    assert [b for pair in zip(*shards, strict=True) for b in pair] == whole[: 2 * len(shards[0])]


def test_webdataset_labels_in_json_are_multi_label(tmp_path):
    import io
    import json
    import tarfile

    from PIL import Image

    tags = {"train": [["dog", "ball"], ["cat"], ["ball"], ["dog"], ["cat", "dog"]], "val": [["cat"], ["ball", "dog"]]}
    for split, rows in tags.items():
        with tarfile.open(tmp_path / f"{split}-000000.tar", "w") as tar:
            for i, row in enumerate(rows):
                png = io.BytesIO()
                Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("json", json.dumps({"labels": row}).encode())):
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    splits, info = load_splits(DataConfig(data=str(tmp_path)))
    assert info.multilabel and info.class_names == ["ball", "cat", "dog"]
    assert [r["label"] for r in splits["val"]] == [[0, 1, 0], [1, 0, 1]]


def test_multilabel_fingerprint_counts_positives_and_sees_relabelled_rows(tmp_path):
    from trainer.data import Data
    from trainer.data.fingerprint import data_fingerprint
    from trainer.run.manifest import fingerprint_changes

    rows = [[0, 1], [2], [1, 2, 3], [0], [3], [0, 2], [1], [2, 3], [0, 1, 2, 3], [1, 3]]
    cfg = DataConfig(data=_saved(tmp_path / "a", rows), val_fraction=0.2)
    old = data_fingerprint(cfg, Data(*load_splits(cfg)))
    total = np.add(old["images_per_class"]["train"], old["images_per_class"]["val"])
    assert total.tolist() == [4, 5, 5, 5]
    cfg = DataConfig(data=_saved(tmp_path / "b", [[0, 1, 2, 3], *rows[1:]]), val_fraction=0.2)
    new = data_fingerprint(cfg, Data(*load_splits(cfg)))
    assert fingerprint_changes(old, new)[0] == "train images per class: ball 5 -> 6, tree 4 -> 5"
