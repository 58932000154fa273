"""Checkpoints are complete or not used: the manifest of the files a checkpoint holds (written last, checked before
loading), the loop state's values checked against the run, and the data fingerprint compared on `--resume`.

Light: no torch. Each check returns what is wrong in a few words (None when nothing is), so the Checkpointer can fall
back to an older checkpoint, or refuse, with one line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from trainer.run.layout import CONFIG_FILE, STATE_FILE

MANIFEST_FILE = "manifest.json"  # written last: every file of the checkpoint and its size
FINGERPRINT_FILE = "data_fingerprint.json"  # what the run trained on (trainer.data.fingerprint)
RNG_FILE = "random_states_{rank}.pkl"  # accelerate's per-rank RNG states, which load_state skips silently if absent
SHOWN = 3


@dataclass(frozen=True)
class RunShape:
    """What a checkpoint's loop state must fit: the run's epochs and this data's batches per epoch."""

    epochs: int
    batches_per_epoch: int = 0  # micro-batches of one rank; 0: unknown (not checked)
    grad_accum: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)


def write_manifest(folder: Path, step: int, num_processes: int) -> None:
    """Main process only, after every rank wrote its part: list every file with its size, then the manifest itself."""
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {"step": step, "num_processes": num_processes, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=0))


def required_files(num_processes: int) -> list[str]:
    """The files every checkpoint holds for each rank, whatever else it holds."""
    return [name.format(rank=r) for r in range(num_processes) for name in (STATE_FILE, RNG_FILE)]


def manifest_problem(folder: Path) -> str | None:
    """What makes the checkpoint incomplete or damaged: a file of its manifest missing or of another size, a per-rank
    file missing. A checkpoint written before manifests existed is checked for the per-rank files only."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        state = _read_state(folder, 0)
        world = state.get("num_processes", 1) if isinstance(state, dict) else 1
        missing = [f for f in required_files(world if isinstance(world, int) else 1) if not (folder / f).is_file()]
        return f"{_names(missing)} missing" if missing else None
    try:
        manifest = json.loads(path.read_text())
        files, world = dict(manifest["files"]), int(manifest["num_processes"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} unreadable"
    unlisted = [f for f in required_files(world) if f not in files]
    if unlisted:
        return f"{_names(unlisted)} never written"
    missing, resized = [], []
    for name, size in files.items():
        file = folder / name
        if not file.is_file():
            missing.append(name)
        elif file.stat().st_size != size:
            resized.append(f"{name} {file.stat().st_size} bytes, {size} written")
    if missing:
        return f"{_names(missing)} missing"
    if resized:
        return f"{_names(resized)}: truncated or changed"
    return None


def state_problem(states: list, shape: RunShape, check_step: bool = True) -> str | None:
    """What makes the per-rank loop states (TrainState-like) impossible for this run: out-of-range values, ranks that
    disagree on the position, a step count that does not match the epoch and batch position (`check_step`: the data
    is the one the checkpoint trained on)."""
    first = states[0]
    if any((s.epoch, s.step, s.batches_in_epoch) != (first.epoch, first.step, first.batches_in_epoch) for s in states):
        return "its ranks' states disagree on the position"
    ints = ("epoch", "step", "batches_in_epoch", "best_epoch", "skipped_steps", "num_processes")
    for s in states:
        bad = [f"{k} {getattr(s, k)!r}" for k in ints if type(getattr(s, k)) is not int or getattr(s, k) < 0]
        bad += [f"{k} {getattr(s, k)!r}" for k in ("loss_sum", "seen") if not _finite(getattr(s, k), low=0.0)]
        if not _finite(s.best_top1, low=-1.0) or s.best_top1 > 1:
            bad.append(f"best_top1 {s.best_top1!r}")
        if bad:
            return f"state values out of range: {', '.join(bad[:SHOWN])}"
    if first.epoch > shape.epochs:
        return f"epoch {first.epoch} beyond the run's {shape.epochs} epochs"
    if not shape.batches_per_epoch:
        return None
    if first.batches_in_epoch >= shape.batches_per_epoch:
        return f"batches_in_epoch {first.batches_in_epoch}, an epoch here has {shape.batches_per_epoch} batches"
    if any(s.best_epoch > first.epoch or s.skipped_steps > first.step for s in states):
        return "best_epoch or skipped_steps beyond the run's position"
    expected = first.epoch * shape.steps_per_epoch + math.ceil(first.batches_in_epoch / shape.grad_accum)
    if check_step and first.step != expected:
        return f"step {first.step}, but epoch {first.epoch} + {first.batches_in_epoch} batches make step {expected}"
    return None


def read_fingerprint(folder: Path) -> dict | None:
    """The data fingerprint stored in a checkpoint; None for a checkpoint written before fingerprints existed."""
    try:
        return json.loads((folder / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What changed between two data fingerprints, in words ("train images 4800 -> 5200"); empty when nothing did."""
    changes = [
        f"{split} images {old[key]} -> {new[key]}"
        for split, key in (("train", "train_images"), ("val", "val_images"))
        if old.get(key) != new.get(key)
    ]
    old_classes, new_classes = list(old.get("classes", [])), list(new.get("classes", []))
    added = [c for c in new_classes if c not in old_classes]
    removed = [c for c in old_classes if c not in new_classes]
    if added:
        changes.append(f"classes added: {_names(added)}")
    if removed:
        changes.append(f"classes removed: {_names(removed)}")
    if not added and not removed and old_classes != new_classes:
        changes.append("class order changed")
    if not added and not removed:
        changes += _class_changes(old, new, new_classes)
    for what, key in (("shards", "shards"),):
        old_shards, new_shards = old.get(key) or {}, new.get(key) or {}
        if old_shards != new_shards:
            differ = sorted(
                set(old_shards) ^ set(new_shards)
                | {n for n in old_shards if new_shards.get(n, old_shards[n]) != old_shards[n]}
            )
            changes.append(f"{what} added, removed or resized: {_names(differ)}")
    if (old.get("excluded") or {}) != (new.get("excluded") or {}):
        counts = [(f.get("excluded") or {}).get("files", 0) for f in (old, new)]
        changes.append(f"--exclude left out other files ({counts[0]} -> {counts[1]})")
    # A checkpoint without a listing (a labels.csv folder's, before trainer listed its files) cannot tell.
    if not changes and old.get("listing") and old["listing"] != new.get("listing", ""):
        changes.append("files replaced or rewritten in the folder: sizes or modification times differ")
    return changes


def _class_changes(old: dict, new: dict, classes: list[str]) -> list[str]:
    """Per-class counts and file names: swapped contents, moved or changed files."""
    changes = []
    old_counts, new_counts = old.get("images_per_class") or {}, new.get("images_per_class") or {}
    for split in sorted(set(old_counts) & set(new_counts)):
        if len(old_counts[split]) == len(new_counts[split]) == len(classes):
            moved = [
                f"{c} {a} -> {b}"
                for c, a, b in zip(classes, old_counts[split], new_counts[split], strict=True)
                if a != b
            ]
            if moved:
                changes.append(f"{split} images per class: {_names(moved)}")
    old_files, new_files = old.get("class_files") or {}, new.get("class_files") or {}
    for split in sorted(set(old_files) & set(new_files)):
        before, after = old_files[split], new_files[split]
        if "*" in before or "*" in after:  # multi-label: one digest of every file name with its label row
            if before != after and not changes:
                changes.append(f"{split} files renamed, moved or relabelled")
            continue
        changed = [c for c in classes if before.get(c) != after.get(c)]
        if not changed:
            continue
        owner = {digest: c for c, digest in before.items()}
        swapped = sorted({tuple(sorted((c, owner[after[c]]))) for c in changed if after.get(c) in owner})
        if swapped:
            changes.append(f"{split} classes swapped: " + ", ".join(f"{a} <-> {b}" for a, b in swapped[:SHOWN]))
        elif not changes:
            changes.append(f"{split} files renamed or moved in classes {_names(changed)}")
    return changes


def record_data_change(run_dir: Path, step: int, changes: list[str]) -> None:
    """Main process only: note in config.yaml that the run continued at `step` on data that changed (--data-changed
    ok), and how."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    record = yaml.safe_load(path.read_text()) or {}
    record.setdefault("data_changes", []).append({"resumed_at_step": step, "changes": changes})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(record, sort_keys=False))
    tmp.replace(path)


def _read_state(folder: Path, rank: int):
    try:
        return json.loads((folder / STATE_FILE.format(rank=rank)).read_text())
    except (OSError, ValueError):
        return None


def _finite(value, low: float) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= low


def _names(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
