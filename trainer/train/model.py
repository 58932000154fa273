"""timm model creation and the SyncBatchNorm decision."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import ModelConfig, UserError


@dataclass(frozen=True)
class SyncBNDecision:
    applied: bool
    reason: str


def build_model(
    cfg: ModelConfig, num_classes: int, in_chans: int, imgsz: int | None = None, sizes: dict[int, str] | None = None
) -> torch.nn.Module:
    """Create `cfg.model` from timm with our class count and input channels, optionally from pretrained weights.

    `imgsz`: the input size the model will see. Models built for a fixed size (ViT, DeiT, Swin, EVA, BEiT, ...) are
    created for it (timm's `img_size`; timm resamples pretrained position embeddings), or refused in one line.
    `sizes`: other sizes it must take too, each with the flag that asks for it (see `size_kwargs`)."""
    model = _create(cfg, num_classes, in_chans, size_kwargs(cfg.model, num_classes, in_chans, imgsz, sizes))
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as e:  # how timm models without it say so
            raise UserError(f"--grad-checkpointing: timm's {cfg.model} does not support it; drop the flag") from e
    # Inputs need no conversion: a convolution with channels-last weights returns channels-last activations.
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def size_kwargs(
    name: str, num_classes: int, in_chans: int, imgsz: int | None, sizes: dict[int, str] | None = None
) -> dict:
    """`{"img_size": imgsz}` for a model built for a fixed input size other than `imgsz`, else `{}`; with `sizes`
    ({px: the flag asking for it}: --progressive, --test-imgsz) also `dynamic_img_size` for such a model.

    The size is tried first on a weightless (meta-device) copy, in eval mode, with one image: a model that cannot
    take it (no `img_size` argument, a size its patches, windows or stages do not fit) is refused in one line
    before any real weights are allocated or loaded."""
    from timm.models import get_pretrained_cfg

    check_model_name(name)
    pretrained_cfg = get_pretrained_cfg(name)
    sizes = {px: flag for px, flag in (sizes or {}).items() if px and px != imgsz}
    fixed = pretrained_cfg is not None and pretrained_cfg.fixed_input_size
    if sizes and imgsz is not None:
        # Every size, convolutional nets included: a net's stages can run out of pixels at a small START_PX.
        kwargs = ({"img_size": imgsz} if imgsz != pretrained_cfg.input_size[-1] else {}) if fixed else {}
        if fixed:
            kwargs["dynamic_img_size"] = True  # timm's ViTs: position embeddings resampled to each size
        _probe(name, num_classes, in_chans, kwargs, {**sizes, imgsz: f"--imgsz {imgsz}"})
        return kwargs
    if imgsz is None or not fixed:
        return {}  # convolutional nets pool whatever size they get
    default = pretrained_cfg.input_size[-1]
    if imgsz == default:
        return {}
    kwargs = {"img_size": imgsz}
    hint = (
        f"is built for {default} px and cannot take --imgsz {imgsz}",
        f"use --imgsz {default} or a size its patches fit",
    )
    _probe(name, num_classes, in_chans, kwargs, {imgsz: ""}, hint)
    return kwargs


def _probe(name: str, num_classes: int, in_chans: int, kwargs: dict, sizes: dict[int, str], said=None) -> None:
    """Refuse (one line) the first of `sizes` ({px: the flag asking for it}) the model cannot take, found on a
    weightless copy. `said`: (what, hint) of the message, when the flag alone does not say it."""
    import timm

    px = 0
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs).eval()
            for px in sizes:
                probe(torch.empty(1, in_chans, px, px))
    except NotImplementedError:
        pass  # an operator without a meta kernel: nothing learned about the size, the real run will tell
    except Exception as e:  # TypeError (no img_size), AssertionError, RuntimeError (shapes): all mean "not this size"
        why = f"{type(e).__name__}: {e}".split("\n")[0][:160]
        what, hint = said or (
            f"cannot take {px} px ({sizes.get(px) or 'its size'})",
            "use a size its patches, windows and stages fit (a multiple of its patch size for a ViT)",
        )
        raise UserError(f"--model {name} {what} ({why}); {hint}") from e


def patch_size(model: torch.nn.Module) -> int:
    """The side of the patches a ViT-like model cuts images into (timm's `patch_embed`); 0 for other models."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return 0
    return int(patch[0] if isinstance(patch, tuple | list) else patch)


def check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"--model {name!r} is not a timm model{hint}")


def _create(cfg: ModelConfig, num_classes: int, in_chans: int, size: dict) -> torch.nn.Module:
    import timm

    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **size)
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.drop > 0:
        kwargs["drop_rate"] = cfg.drop
    if not cfg.pretrained:
        return timm.create_model(cfg.model, **kwargs)
    if cfg.pretrained == "default":
        try:
            # HF_HUB_OFFLINE=1 (set by the CLI unless --allow-download) keeps this to the local cache.
            return timm.create_model(cfg.model, pretrained=True, **kwargs)
        except Exception as e:  # timm raises several hub/cache error types; all mean "not available here"
            raise UserError(
                f"--pretrained: no pretrained weights for {cfg.model!r} in the local HF cache ({type(e).__name__}); "
                "run once with --allow-download, or pass --pretrained PATH to a weights file"
            ) from e
    state_dict = load_weights(cfg.pretrained)
    overlay = dict(state_dict=state_dict)
    # timm keeps the file's classifier only when its class count equals the overlay's num_classes (else it
    # re-initialises the head, as for ImageNet weights on new classes): tell it the file's real count.
    from timm.models import get_pretrained_cfg

    classifier = getattr(get_pretrained_cfg(cfg.model), "classifier", None)
    if isinstance(classifier, str) and f"{classifier}.weight" in state_dict:
        overlay["num_classes"] = state_dict[f"{classifier}.weight"].shape[0]
    # Otherwise as for hub weights: timm adapts the first conv to in_chans.
    return timm.create_model(cfg.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or torch.load(weights_only=True), which refuses pickled code."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--pretrained {path}: no such file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(file)
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"--pretrained {path}: not a readable weights file ({type(e).__name__}: {e})".split("\n")[0]
        ) from e
    for key in ("state_dict", "model", "state_dict_ema"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--pretrained {path}: expected a state dict of tensors")
    return state


def block_classes(model: torch.nn.Module) -> list[str]:
    """Class names of the model's repeated blocks, the units FSDP shards and gathers one at a time.

    timm names no such unit, but its models keep their blocks in a sequence called `blocks` (ViT, DeiT, EVA, BEiT,
    Mixer, ...) or in stages (`stages`, `layers`: Swin, ConvNeXt, ...) that hold their own `blocks`; the blocks are
    the classes found there. Empty when the model has neither (e.g. ResNet's layer1..4)."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList)

    def members(module: torch.nn.Module) -> list[torch.nn.Module]:
        """A stage's blocks: itself when it is a block, its items when it is a plain sequence or has `blocks`."""
        if type(module) in containers:
            return list(module)
        blocks = getattr(module, "blocks", None)
        return list(blocks) if isinstance(blocks, containers) and len(blocks) else [module]

    for name in ("blocks", "stages", "layers"):
        sequence = getattr(model, name, None)
        if isinstance(sequence, containers) and len(sequence):
            return sorted({type(block).__name__ for stage in sequence for block in members(stage)})
    return []


def mark_fsdp_blocks(model: torch.nn.Module) -> list[str]:
    """Name the model's blocks as its FSDP units, before `prepare`: accelerate's TRANSFORMER_BASED_WRAP reads the
    class names from `_no_split_modules` (the transformers convention) unless the launch config names them
    (`fsdp_transformer_layer_cls_to_wrap`). Returns the names; empty: the whole model is one unit."""
    model._no_split_modules = block_classes(model)
    return model._no_split_modules


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def decide_sync_bn(requested: bool, num_processes: int, device_type: str) -> SyncBNDecision:
    """Whether SyncBatchNorm is applied, and why (recorded in config.yaml)."""
    if not requested:
        return SyncBNDecision(False, "not requested")
    if num_processes < 2:
        return SyncBNDecision(False, "one process: plain BatchNorm already sees the whole batch")
    if device_type != "cuda":
        return SyncBNDecision(False, f"device is {device_type}: PyTorch's SyncBatchNorm runs only on CUDA")
    return SyncBNDecision(True, f"{num_processes} processes on CUDA")


def apply_sync_bn(model: torch.nn.Module, requested: bool, num_processes: int, device_type: str):
    """The one place SyncBN is decided and applied. Call before building the optimizer and before `prepare`.

    Returns (model, decision). Uses timm's converter: torch's drops the activation of timm's BatchNormAct2d.
    """
    decision = decide_sync_bn(requested, num_processes, device_type)
    if decision.applied:
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    return model, decision
