"""Backends: who turns stored images into pixels, torch (PIL in the DataLoader workers) or NVIDIA DALI, behind one
small interface, and the one place the choice between them is made (`choose_backend`).

A backend gives a loader three things:
- `examples(pre, augment)`: the per-sample work in the workers (an HF `with_transform` callable);
- `collate(examples)`: how the workers' samples become one batch (a `Batch`, or an `EncodedBatch` for DALI);
- `stage(...)`: what runs in the training process on each batch after the loader is sharded (None for torch; DALI
  decodes there).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import DataConfig, UserError
from trainer.data import dali
from trainer.data.transforms import Augment, ImageTransform, Preprocess

DALI_INSTALL = (
    'pip install -e ".[dali]" in the trainer checkout (the nvidia-dali-cuda130 wheel; nvidia-dali-cuda120 for CUDA 12 '
    "drivers)"
)


@dataclass(frozen=True)
class Backend:
    """The backend a run uses, and why (recorded in config.yaml; `note` is said once on the console)."""

    name: str  # "torch" or "dali"
    reason: str
    note: str = ""

    def examples(self, pre: Preprocess, augment: Augment | None = None, *, upright: bool = False):
        """The workers' per-sample transform: evaluation's when `augment` is None. `upright`: turn images by their
        EXIF orientation here too (the DALI backend's `trainer predict`; every decode by PIL already does)."""
        if self.name == "dali":
            if augment is None:
                return dali.DaliExamples(pre, False, upright=upright)
            return dali.DaliExamples(pre, True, augment.hflip, augment.scale)
        return ImageTransform(pre, False) if augment is None else ImageTransform.training(pre, augment)

    def collate(self, examples):
        """The function that makes one batch of the workers' samples (for `examples`' output)."""
        return dali.collate if self.name == "dali" else examples.collate

    def stage(self, pre: Preprocess, batch_size: int, threads: int, samples=None, augment=None, upright=False):
        """The training process's part (None for torch). `samples`: where the DALI stage fetches replacements."""
        if self.name != "dali":
            return None
        spec = dali.PipelineSpec(batch_size, pre, threads, upright=upright)
        if augment is None:
            return dali.DaliStage(spec, samples)
        return dali.DaliStage(spec, samples, random_erase=augment.random_erase, size=augment.size)


def dali_missing() -> str:
    """Why `nvidia.dali` cannot be used here ("" when it imports)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def choose_backend(cfg: DataConfig, device_type: str) -> Backend:
    """--loader torch|dali|auto -> the backend used. `auto` takes DALI only with CUDA, DALI installed and an
    augmentation DALI can reproduce; `dali` without DALI installed is refused."""
    if cfg.loader == "torch":
        return Backend("torch", "--loader torch")
    if cfg.streaming:  # a stream's batches are made in its workers (samples.EpochStream), with no DALI stage yet
        if cfg.loader == "dali":
            raise UserError("--loader dali does not read --streaming data yet; use --loader torch (or auto)")
        return Backend("torch", "auto: --streaming reads through the torch DataLoader")
    if cfg.loader == "dali":
        missing = dali_missing()
        if missing:
            raise UserError(f"--loader dali needs NVIDIA DALI, which does not import ({missing}); {DALI_INSTALL}")
        return Backend("dali", "--loader dali")
    # Importing DALI takes a second: only when auto could take it.
    if device_type != "cuda":
        return Backend("torch", "auto: no CUDA device (DALI's CPU path is for tests; --loader dali forces it)")
    if cfg.auto_augment:
        reason = f"auto: --auto-augment {cfg.auto_augment} has no DALI equivalent"
        return Backend("torch", reason, note=f"{reason}; loading with the torch DataLoader")
    missing = dali_missing()
    if missing:
        return Backend("torch", f"auto: nvidia.dali not installed ({DALI_INSTALL})")
    return Backend("dali", "auto: CUDA device and nvidia.dali available")
