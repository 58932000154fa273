"""Logit distillation from a frozen teacher (`--teacher`): build the teacher, check that it fits the run, and mix
its term into the loss: (1 - alpha) x task loss + alpha x T^2 x KL(teacher || student), both softened at T.

The teacher only runs forward: eval mode, no gradients, under the run's autocast, on the device. It is never
prepared by Accelerate (not DDP-wrapped, sharded or compiled), never registered for checkpointing and never part of
the student's weights; `--resume` rebuilds it from its weights file, which must still hash as recorded."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from trainer.config import DataConfig, DistillConfig, UserError
from trainer.data import Preprocess, resolve_preprocess
from trainer.run.layout import CONFIG_FILE
from trainer.train.model import check_model_name, load_weights, size_kwargs


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) of the logits softened at temperature T, averaged over the batch (Hinton et al.
    2015; the same term as timm's LogitDistillationTask). T^2 keeps its gradients' scale independent of T."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@dataclass
class Teacher:
    """A frozen teacher and how its term joins the loss. `scale`/`shift` map the student's normalisation of the
    batch to the teacher's (None when both normalise alike); `record` goes into config.yaml as `teacher:`."""

    model: torch.nn.Module
    alpha: float
    temperature: float
    autocast: Callable[[], AbstractContextManager]
    record: dict
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (float32) for a batch normalised for the student: the batch the student sees,
        mixed images included. no_grad rather than inference_mode: kl_div keeps its target for the backward."""
        if self.scale is not None:
            images = images * self.scale + self.shift
        with self.autocast():
            return self.model(images).float()

    def mix(self, task_loss: torch.Tensor, student_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The training loss: (1 - alpha) x `task_loss` + alpha x the distillation term on this batch."""
        kd = distill_loss(student_logits, self.logits(images), self.temperature)
        return (1 - self.alpha) * task_loss + self.alpha * kd

    def describe(self) -> str:
        """The header line of a distilled run."""
        r = self.record
        renorm = "; its inputs renormalised to its own mean/std" if self.scale is not None else ""
        return (
            f"distilling from {r['model']} ({r['weights']}, sha256 {r['sha256'][:12] or 'unknown'}, "
            f"{r['parameters'] / 1e6:.2f}M parameters): alpha {self.alpha}, temperature {self.temperature}{renorm}"
        )


def build_teacher(
    cfg: DistillConfig,
    data_cfg: DataConfig,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    class_names: list[str],
    pre: Preprocess,
    resume_dir: Path | None = None,
) -> Teacher | None:
    """The run's teacher on `device`, frozen, or None without --teacher. Refuses in one line a teacher that does not
    fit: another class count or class order, another image size, a weights file of another model, or (resumed) a
    weights file that changed since the run started. Every rank builds its own, alike."""
    if not cfg.teacher:
        return None
    _as_teacher(check_model_name, cfg.teacher)
    num_classes, imgsz = len(class_names), data_cfg.imgsz
    if cfg.teacher_weights:
        state_dict, meta = _read_file(cfg.teacher_weights)
        _check_file(cfg, state_dict, meta, class_names, imgsz)
        model = _create(cfg, num_classes, pre.in_chans, imgsz, state_dict)
        weights, digest = cfg.teacher_weights, _sha256(Path(cfg.teacher_weights))
    else:
        meta = {}
        model, weights, digest = _create_from_hub(cfg.teacher, num_classes, pre.in_chans, imgsz)
    if resume_dir is not None:
        _check_unchanged(resume_dir, weights, digest)
    model = model.to(device).eval().requires_grad_(False)
    teacher_pre = _teacher_normalisation(data_cfg, model, pre, meta)
    teacher = Teacher(model, cfg.distill_alpha, cfg.distill_temperature, autocast, record={})
    if (teacher_pre.mean, teacher_pre.std) != (pre.mean, pre.std):
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t, as timm's DistillationTeacher.normalize_input
        view = (1, -1, 1, 1)
        s_mean, s_std, t_mean, t_std = (
            torch.tensor(v, device=device).view(view) for v in (pre.mean, pre.std, teacher_pre.mean, teacher_pre.std)
        )
        teacher.scale, teacher.shift = s_std / t_std, (s_mean - t_mean) / t_std
    teacher.record = {
        "model": cfg.teacher,
        "weights": weights,
        "sha256": digest,
        "alpha": cfg.distill_alpha,
        "temperature": cfg.distill_temperature,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mean": list(teacher_pre.mean),
        "std": list(teacher_pre.std),
    }
    return teacher


def _as_teacher(check: Callable, *args):
    """Run a model check written for --model, its one-line refusal naming --teacher instead."""
    try:
        return check(*args)
    except UserError as e:
        raise UserError(str(e).replace("--model", "--teacher", 1)) from None


def _read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (read safely: safetensors, or torch.load weights_only) and its trainer metadata, if any."""
    try:
        state_dict = load_weights(path)
    except UserError as e:
        raise UserError(str(e).replace("--pretrained", "--teacher-weights", 1)) from None
    meta: dict[str, str] = {}
    if path.endswith(".safetensors"):
        from trainer.run.weights import read_metadata

        meta = read_metadata(path)
    return state_dict, meta


def _check_file(cfg: DistillConfig, state_dict: dict, meta: dict[str, str], class_names: list[str], imgsz: int):
    """A weights file for this teacher, these classes in this order, this image size (where the file says so)."""
    import json

    from timm.models import get_pretrained_cfg

    where = f"--teacher-weights {cfg.teacher_weights}"
    if meta.get("model_name", cfg.teacher) != cfg.teacher:
        name = meta["model_name"]
        raise UserError(f"{where} holds a {name}, not a {cfg.teacher}; use --teacher {name}")
    classifier = getattr(get_pretrained_cfg(cfg.teacher), "classifier", None)
    head = state_dict.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    file_classes = head.shape[0] if head is not None else int(meta.get("num_classes", len(class_names)))
    if file_classes != len(class_names):
        raise UserError(
            f"{where} predicts {file_classes} classes, the data has {len(class_names)}; a teacher must predict the "
            "data's classes (train one on this data first)"
        )
    if "class_names" in meta and json.loads(meta["class_names"]) != class_names:
        raise UserError(f"{where} was trained on other classes, or in another order, than this data's; use one of it")
    if "imgsz" in meta and int(meta["imgsz"]) != imgsz:
        raise UserError(
            f"{where} was trained at {meta['imgsz']} px, this run is --imgsz {imgsz}: the teacher sees the student's "
            f"batch; use --imgsz {meta['imgsz']}, or a teacher trained at {imgsz} px"
        )


def _create(cfg: DistillConfig, num_classes: int, in_chans: int, imgsz: int, state_dict: dict) -> torch.nn.Module:
    """The teacher from a state dict, the way --pretrained PATH builds a student (timm adapts the first conv)."""
    import timm

    name = cfg.teacher
    size = _as_teacher(size_kwargs, name, num_classes, in_chans, imgsz)
    overlay = dict(state_dict=state_dict, num_classes=num_classes)
    try:
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes, in_chans=in_chans, **size
        )
    except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors
        why = " ".join(str(e).split())[:200]
        raise UserError(
            f"--teacher-weights {cfg.teacher_weights} does not fit a {name} ({why}); check that --teacher names the "
            "model these weights are of"
        ) from None


def _create_from_hub(name: str, num_classes: int, in_chans: int, imgsz: int) -> tuple[torch.nn.Module, str, str]:
    """timm's default weights for `name` from the local HF cache (HF_HUB_OFFLINE unless --allow-download), with
    where they came from and the cached file's sha256 ('' when the file cannot be located)."""
    import timm
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(name)
    hub_classes = getattr(pretrained, "num_classes", None)
    if hub_classes != num_classes:
        raise UserError(
            f"--teacher-pretrained: timm's {name} weights predict {hub_classes} classes, the data has {num_classes}; "
            "a teacher must predict the data's classes: give --teacher-weights of one trained on this data"
        )
    hub_size = pretrained.input_size[-1]
    if hub_size != imgsz:
        raise UserError(
            f"--teacher-pretrained: timm's {name} weights are for {hub_size} px, this run is --imgsz {imgsz}: the "
            f"teacher sees the student's batch; use --imgsz {hub_size}"
        )
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans)
    except Exception as e:  # timm raises several hub/cache error types; all mean "not available here"
        raise UserError(
            f"--teacher-pretrained: no pretrained weights for {name!r} in the local HF cache ({type(e).__name__}); "
            "run once with --allow-download, or give --teacher-weights PATH"
        ) from None
    repo = pretrained.hf_hub_id or name
    return model, f"hf-hub:{repo}", _hub_sha256(repo)


def _hub_sha256(repo: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return _sha256(Path(path))
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_unchanged(run_dir: Path, weights: str, digest: str) -> None:
    """--resume: the teacher's weights must be the ones the run started with (what it computes depends on them)."""
    try:
        recorded = (yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}).get("teacher") or {}
    except (OSError, yaml.YAMLError):
        recorded = {}
    if recorded.get("sha256") and recorded["sha256"] != digest:
        raise UserError(
            f"--resume: the teacher's weights {weights} changed since the run started (sha256 {digest[:12]}, "
            f"recorded {recorded['sha256'][:12]}); put the original file back, or start a new run"
        )


def _teacher_normalisation(data_cfg: DataConfig, model, pre: Preprocess, meta: dict[str, str]) -> Preprocess:
    """The normalisation the teacher was trained with: from its trainer weights file, else timm's config of it."""
    import json

    if "mean" in meta and "std" in meta:
        mean, std = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
        if len(mean) == pre.in_chans:
            return Preprocess(pre.imgsz, pre.in_chans, mean, std, pre.interpolation, pre.crop_pct)
    return resolve_preprocess(data_cfg, model, pre.in_chans)
