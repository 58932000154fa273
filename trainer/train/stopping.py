"""Early stopping (--patience N): stop once the best metric has not improved for N epochs.

The count of epochs since the best one lives in TrainState, so it is saved with every checkpoint and a resumed run
keeps counting where it was. The engine decides "this epoch was best" (fit()'s is_best); this module only counts.
"""

from __future__ import annotations

from trainer.run.checkpointer import TrainState


def count_epoch(state: TrainState, epoch: int, is_best: bool, patience: int | None, unfreeze_epoch: int = 0) -> bool:
    """Advance the count after `epoch`; True when the run stops here (and `state.stopped_epoch` says where).

    With --unfreeze-epoch E no stop comes before E and the count starts over at E: a plateau of the frozen phase
    says nothing of the whole model, which has not trained yet.

    No collective: is_best comes from validation metrics gathered over all ranks (gather_for_metrics), so every rank
    holds the same count and reaches the same decision at the same epoch."""
    if epoch == unfreeze_epoch:
        state.epochs_since_best = 0
    state.epochs_since_best = 0 if is_best else state.epochs_since_best + 1
    if patience is not None and state.epochs_since_best >= patience and epoch >= unfreeze_epoch:
        state.stopped_epoch = epoch
    return bool(state.stopped_epoch)


def already_stopped(state: TrainState) -> bool:
    """A resumed run that had stopped early (its last checkpoint says so) trains no further epoch."""
    return state.stopped_epoch > 0


def reason(state: TrainState, patience: int | None) -> str:
    """The line the run ends with; empty when it ran all its epochs."""
    if not state.stopped_epoch:
        return ""
    return (
        f"stopped early at epoch {state.stopped_epoch}: no better val metric for {patience} epoch(s) "
        f"since epoch {state.best_epoch} (--patience {patience})"
    )
