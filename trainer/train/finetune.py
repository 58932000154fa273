"""Fine-tuning (--freeze backbone|N, --unfreeze-epoch E): a linear probe, or frozen early stages, unfrozen at epoch E.

The design, chosen so that resume across the unfreeze point stays bit-exact with no optimizer rebuilt:
- The optimizer and its schedule hold every parameter from the start, as in an ordinary run. Frozen parameters
  have requires_grad off, so they get no gradient (grad None), and PyTorch's optimizers skip a parameter without a
  gradient entirely: no update, no weight decay (AdamW's decoupled decay is skipped with it), no moments, no step
  count. That is what "not in the optimizer" means for the arithmetic. At E they start receiving gradients; their
  Adam moments and per-parameter step count start from zero then (bias correction as for a new parameter), while
  the classifier keeps its moments. The optimizer's structure never changes, so accelerate's save_state and
  load_state restore it the same on either side of E, and the one schedule spans the run (no warmup restart).
- Whether a parameter is frozen is a function of the epoch alone (set_epoch), applied at the start of every epoch,
  so a resumed run freezes exactly what the uninterrupted one did.
- Freezing happens after prepare(): DDP registers the parameters that require gradients when it wraps the model,
  and would never all-reduce a parameter unfrozen later. Until E the frozen ones are unused by the backward, so
  DDP runs with find_unused_parameters (trainer.train.launch); no static graph, since the graph changes at E.
- BatchNorm layers whose parameters are frozen run in eval mode while training (hold_frozen_bn), so their running
  statistics stay those of the weights file.
timm's own freeze() works per submodule (the root's cls_token/pos_embed are no submodule's) and its BatchNorm option
swaps layers for FrozenBatchNorm2d, which the prepared model and optimizer would not see; we set requires_grad on
the parameters that timm's get_classifier() and group_matcher() single out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import TrainConfig, UserError

# --freeze without --pretrained: what the header says (a warning, not a refusal: a test of the mechanics is legitimate).
RANDOM_BACKBONE = (
    "warning: --freeze without --pretrained holds randomly initialised weights fixed (a probe of random features); "
    "add --pretrained [PATH] to fine-tune trained ones"
)


@dataclass
class Freeze:
    """The parameter names --freeze holds (of the unwrapped model) and the epoch they are released (0: never)."""

    names: frozenset[str]
    unfreeze_epoch: int = 0

    def frozen_at(self, epoch: int) -> bool:
        return bool(self.names) and (self.unfreeze_epoch == 0 or epoch < self.unfreeze_epoch)


def plan_freeze(cfg: TrainConfig, model: torch.nn.Module, fsdp: bool) -> Freeze | None:
    """What --freeze names on this timm model, or None without it; a refusal in one line where it cannot apply."""
    if not cfg.freeze:
        return None
    if fsdp:
        raise UserError("--freeze is not supported under FSDP; launch with a DDP or single-process config")
    params = [name for name, _ in model.named_parameters()]
    head = _classifier_prefix(model)
    if head is None:
        raise UserError(f"--freeze: {type(model).__name__} has no separate classifier to train; leave out --freeze")
    if cfg.freeze == "backbone":
        names = [n for n in params if not n.startswith(head)]
    else:
        from timm.models import group_parameters

        groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
        count = int(cfg.freeze)
        if count >= len(groups):
            raise UserError(
                f"--freeze {count}: the model has {len(groups) - 1} stage(s) before its classifier (timm's coarse "
                f"groups, the stem first); use --freeze 1..{len(groups) - 1} or --freeze backbone"
            )
        names = [n for group in groups[:count] for n in group if not n.startswith(head)]
    return Freeze(names=frozenset(names), unfreeze_epoch=cfg.unfreeze_epoch)


def describe(freeze: Freeze, cfg: TrainConfig) -> str:
    until = f"until epoch {freeze.unfreeze_epoch}" if freeze.unfreeze_epoch else "for the whole run"
    counts = cfg.patience and freeze.unfreeze_epoch
    patience = f"; --patience counts from epoch {freeze.unfreeze_epoch}" if counts else ""
    return f"--freeze {cfg.freeze}: {len(freeze.names)} parameter tensors frozen {until}{patience}"


def _classifier_prefix(model: torch.nn.Module) -> str | None:
    """`fc.`/`head.`: where timm's get_classifier() sits in the model, or None if it has no trainable classifier."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    if not isinstance(classifier, torch.nn.Module) or not any(True for _ in classifier.parameters()):
        return None
    for name, module in model.named_modules():
        if module is classifier and name:
            return name + "."
    return None


def set_epoch(model: torch.nn.Module, freeze: Freeze | None, epoch: int) -> None:
    """requires_grad for `epoch` (the unwrapped model): off for the frozen names before the unfreeze epoch."""
    if freeze is None:
        return
    frozen = freeze.frozen_at(epoch)
    for name, param in model.named_parameters():
        if name in freeze.names:
            param.requires_grad_(not frozen)


def hold_frozen_bn(model: torch.nn.Module) -> None:
    """After model.train(): BatchNorm layers whose parameters are all frozen keep their statistics (eval mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
