"""Run configuration: small frozen dataclasses, one per component, validated on construction.

Each component receives only its own part (`DataConfig` for data.py, `ModelConfig` for model.py, ...).
The attribute docstrings below are the `--help` text of the matching CLI flags (see cli.py).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any

import yaml


class UserError(Exception):
    """A mistake in the user's input: reported as one line and exit code 2, never as a traceback."""


TRACKERS = ("wandb", "tensorboard", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class DataConfig:
    data: str = "mnist"
    """Dataset: a built-in name (`mnist`: 5,000 real MNIST digits embedded with the install, `digits`: scikit-learn's
    1,797 8x8 digits)."""
    imgsz: int = 32
    """Square image size in pixels fed to the model."""
    workers: int = -1
    """DataLoader worker processes per rank; -1 picks from the CPU count, 0 loads in the training process."""
    val_fraction: float = 0.1
    """Fraction held out (stratified, seeded by --split-seed) for validation when the data has no validation split."""
    split_seed: int = 0
    """Seed of the validation hold-out, kept apart from --seed so that runs with different seeds share one val set."""
    hflip: float = -1.0
    """Horizontal flip probability during training; -1 picks the dataset's default (0 for digits, 0.5 otherwise)."""
    scale: tuple[float, float] = (0.8, 1.0)
    """Random-resized-crop area range for training augmentation, as `min,max`."""

    def __post_init__(self):
        _check(self.imgsz >= 8, f"--imgsz must be at least 8 pixels, got {self.imgsz}")
        _check(self.workers >= -1, f"--workers must be -1 (auto), 0 or more, got {self.workers}")
        _check(0.0 < self.val_fraction < 1.0, f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        _check(self.hflip == -1.0 or 0.0 <= self.hflip <= 1.0, f"--hflip must be a probability or -1, got {self.hflip}")
        _check(
            len(self.scale) == 2 and 0.0 < self.scale[0] <= self.scale[1] <= 1.0,
            f"--scale must be two numbers 0 < min <= max <= 1, got {self.scale}",
        )


@dataclass(frozen=True)
class ModelConfig:
    model: str = "resnet10t"
    """Any timm model name (see `timm.list_models()`)."""
    pretrained: str = ""
    """Start from pretrained weights: `--pretrained` alone takes timm's default weights from the local HF cache,
    `--pretrained PATH` a .safetensors (or weights-only .pth) file. Empty: random init."""
    in_chans: int = 0
    """Input channels of the model; 0 follows the data (1 for grayscale). Images are converted to this count."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm (only applied with more than one process on CUDA)."""
    drop_path: float = 0.0
    """Stochastic depth rate, for models that support it."""

    def __post_init__(self):
        _check(bool(self.model.strip()), "--model must name a timm model, e.g. resnet18")
        _check(self.in_chans >= 0, f"--in-chans must be 0 (follow the data) or positive, got {self.in_chans}")
        _check(0.0 <= self.drop_path < 1.0, f"--drop-path must be in [0, 1), got {self.drop_path}")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"
    """Optimizer name understood by `timm.optim.create_optimizer_v2` (sgd, momentum, adamw, lamb, ...)."""
    lr: float = 2e-3
    """Peak learning rate, reached after warmup."""
    weight_decay: float = 0.05
    """Weight decay (not applied to norm and bias parameters)."""
    momentum: float = 0.9
    """Momentum for SGD-type optimizers."""
    warmup_epochs: float = 0.5
    """Linear warmup length in epochs (fractions allowed), then cosine decay to --min-lr."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine schedule."""

    def __post_init__(self):
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}")
        _check(self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        _check(0 <= self.min_lr <= self.lr, f"--min-lr must be between 0 and --lr, got {self.min_lr}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    """Number of training epochs."""
    batch_size: int = 128
    """GLOBAL batch size per optimizer step, across all processes and accumulation steps."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    seed: int = 0
    """Seed for model init, shuffling and augmentation (each rank derives its own stream)."""
    deterministic: bool = False
    """Use deterministic algorithms (slower on GPU); with --seed makes runs repeatable."""
    mixed_precision: str = ""
    """Override the launcher's mixed precision: no, fp16 or bf16. Empty: keep the launcher's."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy loss."""
    clip_grad: float = 0.0
    """Clip the gradient norm to this value; 0 disables."""
    log_every: int = 20
    """Log train/loss and train/lr to trackers every N optimizer steps."""
    skip_nonfinite: bool = False
    """Skip (and count) optimizer steps whose loss is NaN or inf instead of stopping the run at the first one."""

    def __post_init__(self):
        _check(self.epochs > 0, f"--epochs must be a positive integer, got {self.epochs}")
        _check(self.batch_size > 0, f"--batch-size must be a positive integer, got {self.batch_size}")
        _check(self.grad_accum > 0, f"--grad-accum must be a positive integer, got {self.grad_accum}")
        _check(
            self.mixed_precision in ("", *MIXED_PRECISION),
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
        )
        _check(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.clip_grad >= 0, f"--clip-grad must be 0 (off) or positive, got {self.clip_grad}")
        _check(self.log_every > 0, f"--log-every must be a positive integer, got {self.log_every}")

    def per_device_batch_size(self, num_processes: int) -> int:
        """Micro-batch size of one forward pass on one process."""
        divisor = num_processes * self.grad_accum
        _check(
            self.batch_size % divisor == 0,
            f"--batch-size {self.batch_size} is the global batch and must divide by processes x grad-accum "
            f"= {num_processes} x {self.grad_accum} = {divisor}; use e.g. --batch-size "
            f"{max(divisor, self.batch_size // divisor * divisor)}",
        )
        return self.batch_size // divisor


@dataclass(frozen=True)
class CheckpointConfig:
    checkpoint_every: int = 0
    """Also save a resumable checkpoint every N optimizer steps (one is always saved at each epoch end); 0: epoch ends
    only."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep in {run}/checkpoints."""

    def __post_init__(self):
        _check(self.checkpoint_every >= 0, f"--checkpoint-every must be 0 (off) or more, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")


@dataclass(frozen=True)
class RunConfig:
    project: str = "runs/train"
    """Parent folder of run folders; also the wandb project name (its last path part)."""
    name: str = "exp"
    """Run folder name under --project; incremented (exp2, exp3, ...) unless --exist-ok."""
    exist_ok: bool = False
    """Reuse {project}/{name} if it exists instead of incrementing."""
    tracker: str = "wandb"
    """Experiment trackers, comma-separated: wandb, tensorboard, none."""
    dist_backend: str = ""
    """torch.distributed backend (nccl, gloo); empty lets Accelerate choose."""
    allow_download: bool = False
    """Allow downloads from the HF hub (pretrained weights). Off: only the local cache is used (HF_HUB_OFFLINE=1)."""
    debug: bool = False
    """Show full tracebacks for input errors."""

    def __post_init__(self):
        _check(
            bool(self.name.strip()) and "/" not in self.name, f"--name must be a plain folder name, got {self.name!r}"
        )
        _check(bool(self.project.strip()), "--project must be a folder path")
        for tracker in self.trackers():
            _check(tracker in TRACKERS, f"--tracker {tracker!r} is unknown; choose from {', '.join(TRACKERS)}")
        _check(
            self.dist_backend in ("", "nccl", "gloo"), f"--dist-backend must be nccl or gloo, got {self.dist_backend!r}"
        )

    def trackers(self) -> list[str]:
        """Tracker names without `none`."""
        names = [t.strip() for t in self.tracker.split(",") if t.strip()]
        return [t for t in names if t != "none"] if names != ["none"] else []


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists) for YAML and trackers."""
        return {
            section.name: {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(getattr(self, section.name)).items()
            }
            for section in dataclasses.fields(self)
        }


# Facts a run writes into its config.yaml next to the settings; not settings themselves.
RECORD_SECTIONS = ("launch", "dataset")
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def build_config(values: dict[str, dict[str, Any]]) -> Config:
    """Build a validated Config from nested section dicts; unknown sections or keys are errors."""
    unknown_sections = sorted(set(values) - set(SECTIONS))
    _check(not unknown_sections, f"unknown section(s) {', '.join(unknown_sections)}; valid: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        section = dict(values.get(name) or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - set(known))
        _check(not unknown, f"unknown key(s) in {name}: {', '.join(unknown)}; valid keys: {', '.join(known)}")
        for key, value in section.items():
            section[key] = coerce_value(known[key], value, f"{name}.{key}")
        sections[name] = cls(**section)
    return Config(**sections)


def coerce_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise a one-line UserError."""
    default = f.default
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(x) for x in items)
        if f.name == "pretrained":  # YAML `pretrained: true` means timm's default weights
            return (
                {True: "default", False: "", None: ""}.get(value, value)
                if isinstance(value, bool | None)
                else str(value)
            )
        if isinstance(value, bool):  # YAML `epochs: true` is a mistake, not 1
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return "" if value is None else str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__ if not isinstance(default, tuple) else "two comma-separated numbers"
        raise UserError(f"{where} expects {kind}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, dict[str, Any]]:
    """Read a run YAML (nested by section). `launch:` and `dataset:`, records written into run folders, are ignored."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"--config {path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"--config {path}: not valid YAML{where}; fix the syntax") from None
    _check(isinstance(values, dict), f"--config {path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for record in RECORD_SECTIONS:
        values.pop(record, None)
    unknown = sorted(set(values) - set(SECTIONS))
    _check(not unknown, f"--config {path}: unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    for name, section in values.items():
        _check(section is None or isinstance(section, dict), f"--config {path}: section {name} must be a mapping")
    return {name: section or {} for name, section in values.items()}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), used as --help text."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())  # type: ignore[union-attr]
    return docs
