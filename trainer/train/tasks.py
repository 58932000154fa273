"""What a run learns and how it is scored: single-label (softmax, cross-entropy) or multi-label (per-label sigmoid,
BCE or timm's asymmetric loss), the loss as one call (`Task.loss`), class weights from the training split's label
counts (timm's helpers), and the one value "best" follows (`Best`: metric name + mode).

Pure torch on tensors; no rank logic. Built once per run by `build_task` from the train config and the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import TrainConfig, UserError

# --best-metric -> the results.csv column it reads and whether higher is better.
BEST_KEYS = {
    "top1": ("val/top1", "max"),
    "macro_f1": ("val/macro_f1", "max"),
    "balanced_acc": ("val/balanced_acc", "max"),
    "map": ("val/map", "max"),
    "loss": ("val/loss", "min"),
}
SINGLE_LABEL_ONLY = ("top1", "balanced_acc")
MULTI_LABEL_ONLY = ("map",)


@dataclass(frozen=True)
class Best:
    """What best.safetensors and --sched plateau follow: one metric and whether higher or lower is better."""

    key: str = "val/top1"
    mode: str = "max"

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` beats `than` (None: nothing yet)."""
        if than is None or (isinstance(than, float) and math.isnan(than)):
            return True
        return value > than if self.mode == "max" else value < than

    def plateau_value(self, value: float) -> float:
        """The value for timm's plateau schedule, which we run in mode max."""
        return value if self.mode == "max" else -value


@dataclass
class Task:
    """The run's task: its loss, its class weights, its threshold and its best metric."""

    multilabel: bool
    num_classes: int
    loss_name: str = "ce"  # ce | bce | asl
    label_smoothing: float = 0.0
    threshold: float = 0.5
    best: Best = Best()
    class_weight: torch.Tensor | None = None  # ce: per-class weight
    pos_weight: torch.Tensor | None = None  # bce/asl: per-class positive weight

    @property
    def kind(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch. `targets`: class indices or probabilities (single-label), multi-hot or
        mixed rows (multi-label)."""
        logits = logits.float()
        if not self.multilabel:
            weight = _on(self.class_weight, logits)
            return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)
        if self.loss_name == "asl":
            return self._asl(logits)(logits, targets)
        # Smoothing a binary target moves it towards 0.5 (timm's Mixup(multi_label=True) smooths the same way).
        targets = targets.float() * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=_on(self.pos_weight, logits))

    def _asl(self, logits: torch.Tensor):
        from timm.loss import AsymmetricLossMultiLabel

        fn = AsymmetricLossMultiLabel(smoothing=self.label_smoothing, pos_weight=_on(self.pos_weight, logits))
        return fn.to(logits.device)

    def weights_metadata(self) -> dict[str, str]:
        """What the weights say about their outputs: a softmax over classes, or a sigmoid per label and its
        threshold."""
        if not self.multilabel:
            return {"task": "multiclass", "output": "softmax"}
        return {"task": "multilabel", "output": "sigmoid", "threshold": f"{self.threshold:g}"}

    def sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample validation loss, unweighted and unsmoothed (comparable across runs): (N,)."""
        logits = logits.float()
        if not self.multilabel:
            return F.cross_entropy(logits, targets, reduction="none")
        return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(dim=1)


def restore_best(state, best: Best) -> None:
    """The best so far of a resumed `state` (a TrainState) for `best`: a checkpoint written before --best-metric
    holds only best_top1, the best value of a top-1 run; one resumed with another --best-metric starts over."""
    if state.best_value is None and state.best_top1 >= 0 and best.key == "val/top1":
        state.best_value, state.best_metric = state.best_top1, best.key
    elif state.best_metric and state.best_metric != best.key:
        state.best_value = None


def describe_task(task: Task, class_weights: str, balanced_sampler: bool) -> str:
    """The run's task in one header line: the loss, what best follows, how classes are weighted and drawn."""
    if task.multilabel:
        what = f"multi-label (a sigmoid per label), loss {task.loss_name}, threshold {task.threshold:g}"
    else:
        what = f"single-label (softmax), loss {task.loss_name}"
    weights = f", class weights {class_weights}" if class_weights != "none" else ""
    sampler = ", balanced sampler" if balanced_sampler else ""
    return f"task: {what}, best = {task.best.mode} {task.best.key}{weights}{sampler}"


def _on(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else weight.to(like.device)


def build_task(cfg: TrainConfig, multilabel: bool, num_classes: int, counts: np.ndarray | None = None) -> Task:
    """The Task of a run from --loss, --threshold, --best-metric and --class-weights; `counts`: images per class
    (multi-label: positives per class) of the training split, needed for class weights. Refuses options that do
    not fit the data's task in one line."""
    if multilabel and cfg.loss == "ce":
        raise UserError("--loss ce is single-label; multi-label data trains with --loss bce (default) or asl")
    if not multilabel and cfg.loss in ("bce", "asl"):
        raise UserError(f"--loss {cfg.loss} is for multi-label data, and these labels are one per image; drop it")
    if not multilabel and cfg.threshold != 0.5:
        raise UserError("--threshold applies to multi-label data, and these labels are one per image; drop it")
    if multilabel and cfg.best_metric in SINGLE_LABEL_ONLY:
        raise UserError(f"--best-metric {cfg.best_metric} is single-label; use map, macro_f1 or loss")
    if not multilabel and cfg.best_metric in MULTI_LABEL_ONLY:
        raise UserError(f"--best-metric {cfg.best_metric} is for multi-label data; use top1, macro_f1, balanced_acc")
    metric = cfg.best_metric if cfg.best_metric != "auto" else ("map" if multilabel else "top1")
    loss_name = cfg.loss if cfg.loss != "auto" else ("bce" if multilabel else "ce")
    task = Task(multilabel, num_classes, loss_name, cfg.label_smoothing, cfg.threshold, Best(*BEST_KEYS[metric]))
    if cfg.class_weights != "none":
        if counts is None:
            raise UserError("--class-weights needs the training split's label counts; drop it with --streaming")
        weights = class_weights(cfg.class_weights, counts, multilabel)
        if multilabel:
            task.pos_weight = weights
        else:
            task.class_weight = weights
    return task


def class_weights(method: str, counts: np.ndarray, multilabel: bool, num_samples: int | None = None) -> torch.Tensor:
    """timm's `compute_class_weights` from per-class counts (mean 1). Multi-label: a positive weight per class,
    the same method's weights scaled so that the rarest label's positives weigh most."""
    from timm.loss.class_weights import compute_class_weights

    counts = np.asarray(counts, dtype=np.float64)
    total = int(num_samples if num_samples is not None else max(counts.sum(), counts.max(), 1))
    _, weights = compute_class_weights(torch.as_tensor(counts), total, method=method)
    return weights
