"""K-fold cross-validation with the run's own recipe: which training image is held out by which fold, each fold a
resumable sub-run of `train.engine.train`, and the fold model's outputs for every image.

A fold's run folder is `{audit}/folds/fold{k}` (1-based), a training run like any other (config.yaml, results.csv,
checkpoints, weights): finished, it is skipped; half done, it continues from its newest checkpoint; done and its
outputs written (`outputs.npz`), the audit never trains it again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer import data
from trainer.config import Config, UserError
from trainer.run.layout import LAST_WEIGHTS, WEIGHTS, checkpoint_dirs
from trainer.run.resume import finished
from trainer.run.writes import atomic_file
from trainer.train.engine import train
from trainer.use.inference import load_model, read_weights

FOLDS_DIR = "folds"
OUTPUTS = "outputs.npz"  # a fold's probabilities and embeddings of every image: the fold is done


@dataclass(frozen=True)
class FoldPlan:
    """Which fold holds out each training image (stratified by class, seeded by --split-seed)."""

    folds: int
    fold_of: np.ndarray  # (n_train,) 0-based fold of each training image, in the split's order

    def held(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.fold_of == k)

    def kept(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.fold_of != k)


def plan_folds(labels: np.ndarray, folds: int, seed: int, class_names: list[str]) -> FoldPlan:
    """Stratified K folds of the training labels; UserError when K < 2 or a class has fewer images than folds."""
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs at least 2 folds (5 is usual)")
    counts = np.bincount(labels, minlength=len(class_names))
    small = [(class_names[c], int(counts[c])) for c in np.flatnonzero(counts < folds)]
    if small:
        named = ", ".join(f"{name} ({n})" for name, n in small[:5])
        raise UserError(
            f"--folds {folds}: every class needs at least {folds} training images (one per fold) and "
            f"{named} {'has' if len(small) == 1 else 'have'} fewer; lower --folds or add images"
        )
    fold_of = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[held] = k
    return FoldPlan(folds, fold_of)


def fold_dir(audit_dir: Path, k: int) -> Path:
    return Path(audit_dir) / FOLDS_DIR / f"fold{k + 1}"


def fold_config(cfg: Config, audit_dir: Path, k: int) -> Config:
    """The run's recipe in the fold's own folder, without trackers (the audit reports once, at its end)."""
    run = replace(cfg.run, project=str(Path(audit_dir) / FOLDS_DIR), name=f"fold{k + 1}", exist_ok=True)
    return replace(cfg, run=replace(run, tracker="none"))


def fold_select(plan: FoldPlan, k: int):
    """The `select` of train(): train on the other folds, validate on fold k (so its epochs report held-out scores)."""

    def select(loaded: data.Data) -> data.Data:
        if len(loaded.train) != len(plan.fold_of):
            raise UserError(
                f"the training split has {len(loaded.train)} images, the audit planned its folds on "
                f"{len(plan.fold_of)}; the data changed: start a new audit"
            )
        held, kept = plan.held(k), plan.kept(k)
        info = replace(
            loaded.info,
            train_size=len(kept),
            val_size=len(held),
            val_split=f"fold {k + 1} of {plan.folds}, held out by trainer data audit",
        )
        return data.Data({"train": loaded.train.select(kept), "val": loaded.train.select(held)}, info)

    return select


def train_fold(cfg: Config, audit_dir: Path, plan: FoldPlan, k: int) -> str:
    """Train fold k, or continue it from its newest checkpoint; nothing when it finished. Every rank. Returns what
    was done, in words."""
    where = fold_dir(audit_dir, k)
    if finished(where, cfg.train.epochs):
        return "trained before"
    resume = where if checkpoint_dirs(where) else None
    # Collective inside: a whole training; the process group is kept for the next fold (last=False).
    train(fold_config(cfg, audit_dir, k), resume, select=fold_select(plan, k), last=False)
    return "resumed" if resume else "trained"


@torch.no_grad()
def fold_outputs(accelerator, cfg: Config, loaded: data.Data, backend, where: Path) -> dict[str, np.ndarray]:
    """The fold model's (last weights) softmax probabilities and L2-normalised embeddings (timm's
    `forward_head(pre_logits=True)`) of every training and validation image, in dataset order. Every rank."""
    trained = read_weights(where / WEIGHTS / LAST_WEIGHTS)
    model = load_model(trained).to(accelerator.device)
    spec = data.loader_spec(cfg.data, backend, trained.pre)
    # --batch-size auto is resolved inside each fold's training; prediction needs no probe: a batch that fits anyway
    batch_size = 64 if cfg.train.auto_batch else 2 * cfg.train.per_device_batch_size(accelerator.num_processes)
    outputs = {}
    for split in ("train", "val"):
        parts = []
        for batch in data.eval_loader(accelerator, loaded.splits[split], spec, batch_size):
            with accelerator.autocast():
                features = model.forward_features(batch.images)
                embeddings = model.forward_head(features, pre_logits=True).float()
                logits = model.forward_head(features).float()
            rows = (logits.softmax(dim=1), F.normalize(embeddings.flatten(1), dim=1))
            # Collective: every rank; the unshuffled loader gives ranks consecutive batches, so the gathered rows
            # come in dataset order, the padding of the last batch dropped.
            parts.append(accelerator.gather_for_metrics(rows))
        probs, embeddings = (torch.cat(column).cpu().numpy() for column in zip(*parts, strict=True))
        outputs[f"{split}_probs"], outputs[f"{split}_embeddings"] = probs, embeddings.astype(np.float32)
    return outputs


def save_outputs(outputs: dict[str, np.ndarray], where: Path) -> None:
    """outputs.npz, written whole or not at all (main process)."""
    with atomic_file(where / OUTPUTS) as tmp, open(tmp, "wb") as f:
        np.savez(f, **outputs)


def load_outputs(where: Path) -> dict[str, np.ndarray]:
    with np.load(where / OUTPUTS, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}
