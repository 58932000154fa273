"""Run configuration: small frozen dataclasses, one per component, validated on construction.

Each component receives only its own part (`DataConfig` for data/, `ModelConfig` for train/model.py, ...).
The attribute docstrings below are the `--help` text of the matching CLI flags (see flags.py).

Larger than the ~400 lines a module is kept under, on purpose: every flag of `trainer train` is one field here with
its help and its check, and one file is where a user's YAML key, a flag and its validation are found together.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """A mistake in the user's input: reported as one line and exit code 2, never as a traceback."""


TRACKERS = ("wandb", "tensorboard", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULES = ("cosine", "tanh", "step", "constant", "plateau")  # timm.scheduler.create_scheduler_v2 names
LOADERS = ("auto", "torch", "dali")
TASKS = ("auto", "multiclass", "multilabel")
LOSSES = ("auto", "ce", "bce", "asl")
BEST_METRICS = ("auto", "top1", "macro_f1", "balanced_acc", "map", "loss")
CLASS_WEIGHTS = ("none", "inv_freq", "effective_num")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


DEFAULT_BATCH_SIZE = 128  # TrainConfig.batch_size's default, and --batch-size auto's without a GPU
BATCH_AUTO = 0  # TrainConfig.batch_size of --batch-size auto until trainer.train.autobatch resolves it


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class DataConfig:
    data: str = "mnist"
    """Dataset: a built-in name (`mnist`: 5,000 real MNIST digits embedded with the install, `digits`: scikit-learn's
    1,797 8x8 digits), an image folder (`train/`, `val/`, one subfolder per class), a `save_to_disk` folder, Parquet or
    Arrow files (or a folder of them), WebDataset .tar shards (a folder, a glob or `train-{000000..000009}.tar`), or a
    HF hub dataset id (from the local cache unless --allow-download)."""
    data_config: str = ""
    """Configuration (subset) name of a HF hub dataset, e.g. `plain_text`."""
    train_split: str = ""
    """Split to train on; empty: `train` (or the only split)."""
    val_split: str = ""
    """Split to validate on; empty: the first of validation, val, valid, test present, else a --val-fraction
    hold-out."""
    image_column: str = ""
    """Image column; empty: `image`, `img`, `pixel_values`, or the only Image feature."""
    label_column: str = ""
    """Label column; empty: `label`, `labels`, `fine_label`, `class`, or the only ClassLabel (strings become
    classes)."""
    imgsz: int = 32
    """Square image size in pixels fed to the model (with --progressive: the size the ramp ends at)."""
    progressive: int = 0
    """Progressive resizing: train at START_PX pixels first and ramp up to --imgsz, a function of the epoch, in steps
    the model takes (its patch size for ViTs; 32 px for CNNs from --imgsz 128, smaller below). Validation stays at
    --test-imgsz (or --imgsz); the batch size stays the same at every size. 0: off."""
    progressive_ramp: tuple[float, ...] = ()
    """--progressive: the epochs `A,B` where the ramp starts and ends (START_PX up to epoch A, --imgsz from epoch B
    on, linear between); empty: 40 % and 80 % of --epochs, so the last epochs train at full size."""
    test_imgsz: int = 0
    """Image size of evaluation (FixRes: testing above the training size often gains accuracy): validation during
    training uses it, and the weights record it, so `val`, `predict` and `export` use it too. 0: --imgsz."""
    workers: int = -1
    """DataLoader worker processes per rank; -1 picks from the CPU count, 0 loads in the training process."""
    loader: str = "auto"
    """Input path: `torch` (PIL decoding in DataLoader workers), `dali` (NVIDIA DALI decodes and crops, on the GPU
    when there is one; pip install -e ".[dali]" in the checkout), `auto`: DALI with a CUDA device, DALI installed and no
    --auto-augment, else torch."""
    val_fraction: float = 0.1
    """Fraction held out (stratified, seeded by --split-seed) for validation when the data has no validation split."""
    split_seed: int = 0
    """Seed of the validation hold-out, kept apart from --seed so that runs with different seeds share one val set."""
    hflip: float = -1.0
    """Horizontal flip probability during training; -1 picks the dataset's default (0 for digits, 0.5 otherwise)."""
    scale: tuple[float, ...] = ()
    """Random-resized-crop area range for training augmentation, as `min,max`; empty: 0.8,1 up to --imgsz 64,
    0.08,1 (timm's ImageNet default) above."""
    auto_augment: str = ""
    """timm AutoAugment/RandAugment policy, e.g. `rand-m9-mstd0.5` or `augmix-m5`; empty: off."""
    random_erase: float = 0.0
    """Random-erasing probability per training image (timm RandomErasing, per-pixel noise); 0: off."""
    mixup: float = 0.0
    """Mixup alpha (timm Mixup; targets become class probabilities); 0: off. 0.2-0.8 is usual."""
    cutmix: float = 0.0
    """CutMix alpha (with --mixup too, each batch uses one of them at random); 0: off. 1.0 is usual."""
    task: str = "auto"
    """multiclass (one label per image), multilabel (any number: a list per image, or an image folder with a
    labels.csv), or auto: multilabel when the label column holds lists or the folder has a labels.csv."""
    label_delimiter: str = " "
    """labels.csv: the character between an image's labels (a space, as Kaggle's Planet and fastai's from_csv)."""
    balanced_sampler: bool = False
    """Draw each epoch's training samples with probability inverse to their class frequency (with replacement,
    seeded by --seed and the epoch; multi-label: by the rarest of an image's labels)."""
    streaming: bool = False
    """Stream the training split (a hub id, Parquet or WebDataset shards) instead of copying it into the datasets
    cache; the validation split is read once into the cache. Every rank runs the same number of steps per epoch."""
    train_samples: int = 0
    """--streaming: samples per epoch; 0 reads the count from the data (dataset info, Parquet footers, tar headers)."""
    exclude: str = ""
    """A list of files to leave out of the data (one path per line, or a CSV with a `file` column, such as trainer
    data audit's label_issues.csv); the rest keep their split. Recorded in config.yaml and the data fingerprint."""
    shuffle_buffer: int = 10000
    """--streaming: examples held in the shuffle buffer (shard order is shuffled too); larger mixes better, costs
    memory."""

    def __post_init__(self):
        _check(bool(self.data.strip()), "--data must name a dataset, a folder, a file or a hub id")
        _check(self.imgsz >= 8, f"--imgsz must be at least 8 pixels, got {self.imgsz}")
        _check(
            self.progressive == 0 or 8 <= self.progressive < self.imgsz,
            f"--progressive {self.progressive} must be at least 8 px and below --imgsz {self.imgsz} (where the ramp "
            "ends); lower it, raise --imgsz, or drop --progressive",
        )
        _check(
            not self.progressive_ramp or self.progressive > 0,
            "--progressive-ramp sets the epochs of the --progressive ramp; add --progressive START_PX or drop it",
        )
        _check(
            not self.progressive_ramp
            or (
                len(self.progressive_ramp) == 2
                and all(float(e).is_integer() for e in self.progressive_ramp)
                and 1 <= self.progressive_ramp[0] <= self.progressive_ramp[1]
            ),
            "--progressive-ramp takes two epochs A,B with 1 <= A <= B, got "
            + ",".join(f"{e:g}" for e in self.progressive_ramp),
        )
        _check(
            self.test_imgsz == 0 or self.test_imgsz >= 8,
            f"--test-imgsz must be at least 8 pixels, got {self.test_imgsz}",
        )
        _check(self.workers >= -1, f"--workers must be -1 (auto), 0 or more, got {self.workers}")
        _check(self.loader in LOADERS, f"--loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        _check(
            not (self.loader == "dali" and self.auto_augment),
            f"--auto-augment {self.auto_augment} has no DALI equivalent; use --loader torch (or auto) with it",
        )
        _check(0.0 < self.val_fraction < 1.0, f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        _check(self.hflip == -1.0 or 0.0 <= self.hflip <= 1.0, f"--hflip must be a probability or -1, got {self.hflip}")
        _check(
            not self.scale or (len(self.scale) == 2 and 0.0 < self.scale[0] <= self.scale[1] <= 1.0),
            f"--scale must be two numbers 0 < min <= max <= 1, got {self.scale}",
        )
        _check(0.0 <= self.random_erase <= 1.0, f"--random-erase must be a probability, got {self.random_erase}")
        _check(self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix take an alpha >= 0 (0: off)")
        _check(self.train_samples >= 0, f"--train-samples must be 0 (from the data) or more, got {self.train_samples}")
        _check(
            self.streaming or not self.train_samples,
            "--train-samples sets the epoch length of --streaming data; add --streaming or drop it",
        )
        _check(
            not (self.balanced_sampler and self.streaming),
            "--balanced-sampler draws from map-style data and a stream cannot be drawn from; drop --streaming "
            "(or --balanced-sampler)",
        )
        _check(self.task in TASKS, f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _check(len(self.label_delimiter) == 1, f"--label-delimiter must be one character, got {self.label_delimiter!r}")
        _check(
            not (self.exclude and self.streaming),
            "--exclude leaves files out of map-style data and a stream is read as it comes; drop --streaming",
        )
        _check(self.shuffle_buffer >= 1, f"--shuffle-buffer must be at least 1, got {self.shuffle_buffer}")
        if self.auto_augment:
            _check(
                self.auto_augment.split("-")[0] in ("rand", "augmix", "original", "originalr", "v0", "v0r"),
                f"--auto-augment {self.auto_augment!r} is not a timm policy; e.g. rand-m9-mstd0.5, augmix-m5, v0",
            )

    def ramp_epochs(self, epochs: int) -> tuple[int, int]:
        """--progressive: (A, B), the epochs where the ramp starts and ends (given, or 40 % and 80 % of `epochs`)."""
        if self.progressive_ramp:
            return int(self.progressive_ramp[0]), int(self.progressive_ramp[1])
        return max(1, round(0.4 * epochs)), max(1, epochs - round(0.2 * epochs))

    @property
    def eval_imgsz(self) -> int:
        """The size validation, `val`, `predict` and `export` see: --test-imgsz, else --imgsz."""
        return self.test_imgsz or self.imgsz


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
    drop: float = 0.0
    """Dropout rate before the classifier (timm's drop_rate)."""
    channels_last: bool = False
    """Keep weights and activations in channels-last (NHWC) memory layout; faster convolutions on most GPUs."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (timm's
    set_grad_checkpointing): much less activation memory for about a third more compute; same results."""

    def __post_init__(self):
        _check(bool(self.model.strip()), "--model must name a timm model, e.g. resnet18")
        _check(self.in_chans >= 0, f"--in-chans must be 0 (follow the data) or positive, got {self.in_chans}")
        _check(0.0 <= self.drop_path < 1.0, f"--drop-path must be in [0, 1), got {self.drop_path}")
        _check(0.0 <= self.drop < 1.0, f"--drop must be in [0, 1), got {self.drop}")


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
    layer_decay: float = 0.0
    """Layer-wise lr decay (e.g. 0.75 for ViT fine-tunes): lr x this factor per layer below the head; 0: off."""
    fused: bool = True
    """Use the optimizer's fused kernel where PyTorch has one (SGD, Adam, AdamW, ...); else timm's default kernel."""
    sched: str = "cosine"
    """Learning-rate schedule (timm): cosine, tanh, step, constant (after warmup), plateau (per epoch on val top-1)."""
    warmup_epochs: float = 0.5
    """Linear warmup length in epochs (fractions allowed)."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps; replaces --warmup-epochs when positive."""
    warmup_lr: float = 1e-5
    """Learning rate at the start of the warmup."""
    min_lr: float = 1e-5
    """Lowest learning rate: where cosine and tanh end, the floor of plateau decay."""
    decay_epochs: float = 30.0
    """step: epochs between lr decays."""
    decay_rate: float = 0.1
    """step, plateau: factor applied to the lr at each decay."""
    patience_epochs: int = 10
    """plateau: epochs without val top-1 improvement before the lr decays."""
    ema: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3), evaluated every epoch as val/top1_ema."""
    ema_decay: float = 0.9998
    """EMA decay per optimizer step (the ceiling of the decay when --ema-warmup is on)."""
    ema_warmup: bool = True
    """Ramp the EMA decay up from 0 over the first steps, so short runs get a useful average."""

    def __post_init__(self):
        _check(self.lr > 0, f"--lr must be positive, got {self.lr}")
        _check(self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}")
        _check(0 <= self.layer_decay <= 1, f"--layer-decay must be in (0, 1], or 0 for off, got {self.layer_decay}")
        _check(self.sched in SCHEDULES, f"--sched must be one of {', '.join(SCHEDULES)}, got {self.sched!r}")
        _check(self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        _check(self.warmup_steps >= 0, f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        _check(
            not (self.sched == "plateau" and self.warmup_steps),
            "--sched plateau steps once per epoch; give its warmup with --warmup-epochs instead of --warmup-steps",
        )
        _check(self.warmup_lr >= 0, f"--warmup-lr must be 0 or more, got {self.warmup_lr}")
        _check(0 <= self.min_lr <= self.lr, f"--min-lr must be between 0 and --lr, got {self.min_lr}")
        _check(self.decay_epochs > 0, f"--decay-epochs must be positive, got {self.decay_epochs}")
        _check(0 < self.decay_rate <= 1, f"--decay-rate must be in (0, 1], got {self.decay_rate}")
        _check(self.patience_epochs >= 0, f"--patience-epochs must be 0 or more, got {self.patience_epochs}")
        _check(0 < self.ema_decay < 1, f"--ema-decay must be between 0 and 1, got {self.ema_decay}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    """Number of training epochs."""
    batch_size: int = DEFAULT_BATCH_SIZE
    """GLOBAL batch size per optimizer step, across all processes and accumulation steps; `auto`: the largest
    micro-batch that fits the GPU (a probe) x processes x --grad-accum, the default on a CPU."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    seed: int = 0
    """Seed for model init, shuffling and augmentation (each rank derives its own stream)."""
    deterministic: bool = False
    """Use deterministic algorithms (slower on GPU); with --seed makes runs repeatable."""
    mixed_precision: str = ""
    """Override the launcher's mixed precision: no, fp16 or bf16. Empty: keep the launcher's."""
    label_smoothing: float = 0.1
    """Label smoothing of the loss (multi-label: each target moves towards 0.5 by half of it)."""
    loss: str = "auto"
    """ce (cross-entropy, single-label), bce (binary cross-entropy with logits, multi-label), asl (timm's asymmetric
    loss, multi-label); auto: ce or bce by the task."""
    threshold: float = 0.5
    """Multi-label: the probability above which a label counts as predicted (F1, precision, recall, predict)."""
    best_metric: str = "auto"
    """What best.safetensors and --sched plateau follow: top1, macro_f1, balanced_acc, map (multi-label), loss;
    auto: top1 single-label, map multi-label."""
    class_weights: str = "none"
    """Weight the loss by the training split's label counts (timm's helpers): none, inv_freq, effective_num;
    multi-label: as a positive weight per class."""
    clip_grad: float = 0.0
    """Clip the gradient norm to this value; 0 disables."""
    log_every: int = 20
    """Log train/loss and train/lr to trackers every N optimizer steps."""
    compile: bool = False
    """torch.compile the model (inductor, through Accelerate, after prepare). The first steps wait for compilation."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs."""
    skip_nonfinite: bool = False
    """Skip (and count) optimizer steps whose loss is NaN or inf instead of stopping the run at the first one."""
    freeze: str = ""
    """Fine-tuning: `backbone` trains only the classifier (a linear probe); N freezes the first N of timm's coarse
    parameter groups (the stem, then stages). Frozen BatchNorm statistics stay fixed. Empty: train everything."""
    unfreeze_epoch: int = 0
    """With --freeze: train everything from this epoch on (2..--epochs), the optimizer and schedule carrying on; 0:
    stay frozen."""
    patience: int | None = None
    """Early stopping: end the run normally once the best val metric has not improved for N epochs (N >= 1); unset:
    train every epoch."""

    def __post_init__(self):
        _check(self.epochs > 0, f"--epochs must be a positive integer, got {self.epochs}")
        _check(
            self.batch_size > 0 or self.auto_batch, f"--batch-size must be a positive integer, got {self.batch_size}"
        )
        _check(self.grad_accum > 0, f"--grad-accum must be a positive integer, got {self.grad_accum}")
        _check(
            not self.auto_batch or DEFAULT_BATCH_SIZE % self.grad_accum == 0,
            f"--batch-size auto falls back to {DEFAULT_BATCH_SIZE} without a GPU, which --grad-accum "
            f"{self.grad_accum} does not divide; use a --grad-accum that divides {DEFAULT_BATCH_SIZE} (1, 2, 4, ...)",
        )
        _check(
            self.mixed_precision in ("", *MIXED_PRECISION),
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
        )
        _check(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        _check(0 < self.threshold < 1, f"--threshold must be between 0 and 1, got {self.threshold}")
        _check(
            self.best_metric in BEST_METRICS,
            f"--best-metric must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}",
        )
        _check(
            self.class_weights in CLASS_WEIGHTS,
            f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}",
        )
        _check(self.clip_grad >= 0, f"--clip-grad must be 0 (off) or positive, got {self.clip_grad}")
        _check(self.log_every > 0, f"--log-every must be a positive integer, got {self.log_every}")
        _check(
            self.compile_mode in COMPILE_MODES,
            f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}",
        )
        _check(
            self.freeze in ("", "backbone") or (self.freeze.isdigit() and int(self.freeze) > 0),
            f"--freeze must be `backbone` or a positive number of stages, got {self.freeze!r}",
        )
        _check(
            self.unfreeze_epoch == 0 or (self.freeze and 2 <= self.unfreeze_epoch <= self.epochs),
            f"--unfreeze-epoch {self.unfreeze_epoch} needs --freeze and must be between 2 and --epochs "
            f"({self.epochs}), or 0 to stay frozen",
        )
        _check(
            self.patience is None or self.patience >= 1,
            f"--patience must be 1 or more epochs, got {self.patience}; leave it out to train every epoch",
        )

    @property
    def auto_batch(self) -> bool:
        """--batch-size auto, not yet resolved to a number (trainer.train.autobatch)."""
        return self.batch_size == BATCH_AUTO

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
class DistillConfig:
    teacher: str = ""
    """Distil from this timm model (logit distillation: its softened predictions join the loss); empty: off. Its
    weights come from --teacher-weights or --teacher-pretrained."""
    teacher_weights: str = ""
    """--teacher: its weights, a .safetensors from a trainer run (e.g. runs/train/exp/weights/best.safetensors) or a
    timm checkpoint (.safetensors, weights-only .pth), for the same classes as the data."""
    teacher_pretrained: bool = False
    """--teacher: take timm's default pretrained weights from the local HF cache (as --pretrained), when they cover
    the same classes as the data (e.g. ImageNet-1k teacher, ImageNet-1k student)."""
    distill_alpha: float = 0.5
    """--teacher: weight of the distillation term: loss = (1 - alpha) x task loss + alpha x T^2 x KL(teacher || student)
    at temperature T."""
    distill_temperature: float = 1.0
    """--teacher: softmax temperature T of both models' logits in the distillation term (1-4 is usual)."""

    def __post_init__(self):
        _check(0.0 <= self.distill_alpha <= 1.0, f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        _check(self.distill_temperature > 0, f"--distill-temperature must be positive, got {self.distill_temperature}")
        sources = {"--teacher-weights": bool(self.teacher_weights), "--teacher-pretrained": self.teacher_pretrained}
        given = [flag for flag, on in sources.items() if on]
        _check(bool(self.teacher) or not given, f"{' '.join(given)} needs --teacher MODEL (the teacher's timm name)")
        _check(len(given) < 2, "--teacher-weights and --teacher-pretrained are two sources of weights; give one")
        shaping = {"--distill-alpha": (self.distill_alpha, 0.5), "--distill-temperature": (self.distill_temperature, 1)}
        unused = [f"{flag} {value:g}" for flag, (value, default) in shaping.items() if value != default]
        _check(
            bool(self.teacher) or not unused,
            f"{', '.join(unused)} shape(s) a teacher's term and no --teacher is given; add --teacher MODEL or drop it",
        )
        _check(
            not self.teacher or bool(given),
            f"--teacher {self.teacher} needs its weights: --teacher-weights PATH, or --teacher-pretrained",
        )


@dataclass(frozen=True)
class CheckpointConfig:
    checkpoint_every: int = 0
    """Also save a resumable checkpoint every N optimizer steps (one is always saved at each epoch end); 0: epoch ends
    only."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep in {run}/checkpoints."""
    data_changed: str = ""
    """With --resume: `ok` continues a run whose data changed since its checkpoint, on purpose (the change is printed
    and recorded in config.yaml); empty: such a resume is refused, saying what changed."""

    def __post_init__(self):
        _check(self.data_changed in ("", "ok"), f"--data-changed must be ok (or empty), got {self.data_changed!r}")
        _check(self.checkpoint_every >= 0, f"--checkpoint-every must be 0 (off) or more, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {self.keep_checkpoints}")


@dataclass(frozen=True)
class RunConfig:
    project: str = "runs/train"
    """Parent folder of run folders; its last part is also the wandb project unless --wandb-project is given."""
    name: str = "exp"
    """Run folder name under --project; incremented (exp2, exp3, ...) unless --exist-ok."""
    exist_ok: bool = False
    """Reuse {project}/{name} if it exists instead of incrementing."""
    tracker: str = "wandb"
    """Experiment trackers, comma-separated: wandb, tensorboard, none."""
    wandb_project: str = ""
    """wandb project; empty: the last part of --project (runs/train -> train)."""
    entity: str = ""
    """wandb entity (user or team); empty: your default entity."""
    tags: str = ""
    """wandb run tags, comma-separated."""
    notes: str = ""
    """wandb run notes: a sentence on what this run tries."""
    dist_backend: str = ""
    """torch.distributed backend (nccl, gloo); empty lets Accelerate choose."""
    dist_timeout: float = 0.0
    """Minutes the processes wait for each other (forming the group, any collective) before the job fails, so a
    dead peer ends it; 0: PyTorch's default (NCCL 10, gloo 30). Leave room for the slowest wait: dataset caching on
    the main process, checkpoint writes."""
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
        _check(
            self.dist_timeout >= 0,
            f"--dist-timeout must be minutes, or 0 for PyTorch's default, got {self.dist_timeout}",
        )

    def wandb_project_name(self) -> str:
        """The wandb project: --wandb-project, else the last part of --project."""
        return self.wandb_project or Path(self.project).name or "trainer"

    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]

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
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        ramp = self.data.progressive_ramp
        _check(
            not ramp or ramp[1] <= self.train.epochs,
            f"--progressive-ramp {int(ramp[0]) if ramp else 0},{int(ramp[1]) if ramp else 0} ends after the last epoch "
            f"({self.train.epochs}); give epochs between 1 and --epochs",
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists) for YAML and trackers."""
        return {
            section.name: {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(getattr(self, section.name)).items()
            }
            for section in dataclasses.fields(self)
        }


# Facts a run writes into its config.yaml next to the settings; not settings themselves (`audit`: trainer data audit's).
RECORD_SECTIONS = ("launch", "dataset", "teacher", "audit")
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
            items = [x for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value or ())
            return tuple(float(x) for x in items)
        if f.name == "pretrained":  # YAML `pretrained: true` means timm's default weights
            return (
                {True: "default", False: "", None: ""}.get(value, value)
                if isinstance(value, bool | None)
                else str(value)
            )
        if isinstance(value, bool):  # YAML `epochs: true` is a mistake, not 1
            raise ValueError
        if f.name == "batch_size" and isinstance(value, str) and value.strip().lower() == "auto":
            return BATCH_AUTO
        if f.name == "batch_size" and isinstance(value, str) and value.strip() == "0":  # BATCH_AUTO is internal
            raise ValueError
        if default is None and value in (None, ""):  # an optional count (--patience) left unset
            return None
        if isinstance(default, int) or default is None:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return "" if value is None else str(value)
    except (TypeError, ValueError):
        kind = type(default).__name__ if not isinstance(default, tuple) else "two comma-separated numbers"
        kind = "int" if default is None else "int or auto" if f.name == "batch_size" else kind
        raise UserError(f"{where} expects {kind}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, dict[str, Any]]:
    """Read a run YAML (nested by section). `launch:`, `dataset:` and `teacher:`, records written into run folders,
    are ignored."""
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
