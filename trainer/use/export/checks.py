"""Every export checked on real data, and int8 calibrated on it, through `trainer val`'s own preprocessing.

- `check_data`: the run's validation split (or --data's), preprocessed as in validation (the torch backend's eval
  transform: resize, centre crop, normalise, from the model's metadata), with PyTorch's logits computed once;
  random inputs only when there is no data to name (then only the logits are compared);
- `compare`: top-1 (mAP for multi-label) of PyTorch and of the export on those images, the difference in
  percentage points, the max |logit difference| and how many top classes agree;
- `calibration_images`: a few hundred training images, evenly spread over the split, for int8's activation ranges.
Bounds (docs/use.md): fp32 within 0.5 pp of PyTorch; fp16 / bf16 within 1 pp; int8 within 2 pp; on random inputs
(no data named) fp32 must agree on 95 % of the top classes and the others are reported only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trainer import data
from trainer.config import UserError
from trainer.report.metrics import average_precisions
from trainer.use.inference import TrainedWeights, check_classes, data_config_for

BOUNDS_PP = {"fp32": 0.5, "fp16": 1.0, "bf16": 1.0, "int8": 2.0}  # max |metric difference| to PyTorch, in pp
RANDOM_INPUTS = 64
RANDOM_AGREEMENT = 0.95  # fp32 on random inputs (no data named): the share of top classes that must agree
CHECK_BATCH = 32


@dataclass
class CheckData:
    """The images an export is checked on, and what PyTorch makes of them."""

    loader: object  # re-iterable batches (images, labels); labels None for random inputs
    source: str
    images: int
    multilabel: bool
    reference: list[torch.Tensor] = field(default_factory=list)  # PyTorch's logits, batch by batch

    @property
    def real(self) -> bool:
        return not self.source.startswith("random")

    def batches(self):
        for batch in self.loader:
            yield (batch.images, batch.labels) if hasattr(batch, "images") else batch


def check_data(model: torch.nn.Module, trained: TrainedWeights, data_name: str | None, limit: int | None) -> CheckData:
    """The run's validation images (the first `limit` when given), or random inputs without data; with PyTorch's
    logits on them."""
    cfg = data_config_for(trained, data_name)
    pre = trained.pre
    if cfg is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(RANDOM_INPUTS, pre.in_chans, pre.imgsz, pre.imgsz, generator=generator)
        loader = [(batch, None) for batch in images.split(CHECK_BATCH)]
        checked = CheckData(loader, "random inputs (no run config.yaml beside the weights, no --data)", 64, False)
    else:
        splits, info = data.load_splits(cfg)
        check_classes(trained, info.class_names, cfg.data)
        val = splits["val"]
        if limit:
            val = val.select(range(min(limit, len(val))))
        spec = data.LoaderSpec(data.Backend("torch", "export check"), pre, workers=0)
        loader = data.eval_loader(None, val, spec, CHECK_BATCH)
        checked = CheckData(loader, f"validation images of {info.source}", len(val), trained.multilabel)
    with torch.no_grad():
        checked.reference = [model(images).float() for images, _ in checked.batches()]
    return checked


@dataclass
class Comparison:
    """PyTorch vs an export on the check images."""

    metric: str  # "top-1" or "mAP"; "" on random inputs
    reference: float
    exported: float
    max_logit_diff: float
    agree: int  # images whose top class is the same
    images: int

    @property
    def delta_pp(self) -> float:
        return 100.0 * (self.exported - self.reference)

    def line(self) -> str:
        agree = f"top class agrees on {self.agree}/{self.images}, max |logit diff| {self.max_logit_diff:.2e}"
        if not self.metric:
            return agree
        return (
            f"{self.metric} PyTorch {self.reference:.4f}, export {self.exported:.4f} ({self.delta_pp:+.2f} pp); {agree}"
        )


def compare(exported: torch.nn.Module, checked: CheckData) -> Comparison:
    """Run the export over the check images; compare with PyTorch's logits."""
    ours, theirs, labels = [], [], []
    with torch.no_grad():
        for (images, target), reference in zip(checked.batches(), checked.reference, strict=True):
            ours.append(reference)
            theirs.append(exported(images).float().cpu())
            labels.append(target)
    ours_all, theirs_all = torch.cat(ours), torch.cat(theirs)
    diff = float((ours_all - theirs_all).abs().max())
    agree = int((ours_all.argmax(1) == theirs_all.argmax(1)).sum())
    if not checked.real:
        return Comparison("", 0.0, 0.0, diff, agree, len(ours_all))
    target = torch.cat(labels)
    if checked.multilabel:
        score = [_map(logits, target) for logits in (ours_all, theirs_all)]
        return Comparison("mAP", *score, diff, agree, len(ours_all))
    score = [float((logits.argmax(1) == target).float().mean()) for logits in (ours_all, theirs_all)]
    return Comparison("top-1", *score, diff, agree, len(ours_all))


def _map(logits: torch.Tensor, targets: torch.Tensor) -> float:
    aps = average_precisions(targets.numpy().astype(np.int8), logits.sigmoid().numpy())
    return float(np.nanmean(aps)) if np.isfinite(aps).any() else 0.0


def within_bound(comparison: Comparison, precision: str) -> str:
    """ "" when the export is within its precision's bound, else why not (one line)."""
    bound = BOUNDS_PP[precision]
    if comparison.metric and abs(comparison.delta_pp) > bound:
        return (
            f"{precision} export's {comparison.metric} differs from PyTorch's by {comparison.delta_pp:+.2f} pp "
            f"(bound {bound:g} pp)"
        )
    # Random inputs: no metric to bound, and near-tied logits may swap; fp32 must still agree almost everywhere.
    if not comparison.metric and precision == "fp32" and comparison.agree < RANDOM_AGREEMENT * comparison.images:
        return f"fp32 export's top class differs from PyTorch's on {comparison.images - comparison.agree} inputs"
    return ""


def calibration_images(trained: TrainedWeights, data_name: str | None, count: int) -> tuple[torch.Tensor, str]:
    """`count` training images spread evenly over the training split, through the eval preprocessing."""
    cfg = data_config_for(trained, data_name)
    if cfg is None:
        raise UserError(
            f"--int8 calibrates on training images, but {trained.path.name} has no config.yaml of its run beside it "
            "(RUN/weights/) to say which data; pass --data"
        )
    splits, info = data.load_splits(cfg)
    check_classes(trained, info.class_names, cfg.data)
    train = splits["train"]
    if not hasattr(train, "__len__") or len(train) == 0:
        raise UserError(f"--int8 needs training images to calibrate on; {info.source} has no map-style train split")
    step = max(1, len(train) // count)
    picked = train.select(range(0, len(train), step)[:count])
    spec = data.LoaderSpec(data.Backend("torch", "int8 calibration"), trained.pre, workers=0)
    images = torch.cat([batch.images for batch in data.eval_loader(None, picked, spec, 64)])
    return images, f"{len(images)} training images of {info.source}"
