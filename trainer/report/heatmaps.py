"""Class-activation heatmaps (`--cam` on `trainer val` and `trainer predict`) through the `grad-cam` package
(pytorch-grad-cam): Grad-CAM by default, its relatives by `--cam-method`.

The target layer is chosen for the model's family, and a model neither family fits is refused in one line:
- timm CNNs: the last stage that `feature_info` names (ResNet `layer4`, ConvNeXt `stages.3`, ...) whose map is at
  least 2 x 2 at this input size (at 16 px a stride-32 stage is one pixel: an earlier stage says more);
- ViT-style models (`blocks` + `num_prefix_tokens`): `blocks[-1].norm1`, its tokens reshaped into the patch grid of
  the input size after the prefix (class, register) tokens are removed.

Here, not in use/, because what it makes is a picture for people (report/), and both val and predict draw it.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.config import UserError
from trainer.run.writes import atomic_file

METHODS = {  # --cam-method -> the grad-cam class (all take target_layers and reshape_transform)
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "gradcamelementwise": "GradCAMElementWise",
}
EXTRA = "inspect"  # the pyproject extra that installs grad-cam


def grad_cam_module():
    """pytorch_grad_cam, or one line naming the extra that installs it."""
    try:
        import pytorch_grad_cam
    except ImportError:
        raise UserError(f'--cam needs the grad-cam package: pip install -e ".[{EXTRA}]"') from None
    return pytorch_grad_cam


def target_layers(model: torch.nn.Module, model_name: str, imgsz: int, in_chans: int):
    """([the layer], reshape_transform or None) for `model` at `imgsz`; UserError for a model no rule fits."""
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed"):
        return _vit_layers(model, model_name, imgsz, in_chans)
    modules = dict(model.named_modules())
    stages = [info for info in getattr(model, "feature_info", []) if info.get("module") in modules]
    outputs: dict[str, tuple] = {}
    hooks = [
        modules[s["module"]].register_forward_hook(
            lambda _m, _i, out, name=s["module"]: outputs.__setitem__(name, tuple(getattr(out, "shape", ())))
        )
        for s in stages
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, imgsz, imgsz, device=_device(model)))
    finally:
        for hook in hooks:
            hook.remove()
    # NCHW maps with the channels feature_info promises; a model whose stages give tokens or NHWC maps (MLP-Mixer,
    # Swin) matches no rule.
    maps = [s for s in stages if len(outputs.get(s["module"], ())) == 4 and outputs[s["module"]][1] == s["num_chs"]]
    if not maps:
        raise UserError(
            f"--cam: {model_name} has no stage with a spatial map that grad-cam can use (supported: timm CNNs and "
            "ViT-style models with blocks and prefix tokens); drop --cam"
        )
    wide = [s for s in maps if min(outputs[s["module"]][2:]) >= 2]
    return [modules[(wide or maps)[-1]["module"]]], None


def _vit_layers(model, model_name: str, imgsz: int, in_chans: int):
    """blocks[-1].norm1, and the transform from its tokens to an NCHW map of the patch grid."""
    layer = getattr(model.blocks[-1], "norm1", None)
    patch = getattr(model.patch_embed, "patch_size", None)
    if layer is None or patch is None:
        raise UserError(f"--cam: {model_name}'s last block has no norm1 or no patch size; drop --cam")
    prefix = int(model.num_prefix_tokens)
    grid = (imgsz // patch[0], imgsz // patch[1])

    def reshape_transform(tokens: torch.Tensor) -> torch.Tensor:
        # (B, prefix + h*w, C) -> (B, C, h, w): the class and register tokens have no place in the image
        patches = tokens[:, prefix:, :]
        return patches.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1]).permute(0, 3, 1, 2)

    shape: list = []
    hook = layer.register_forward_hook(lambda _m, _i, out: shape.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, imgsz, imgsz, device=_device(model)))
    finally:
        hook.remove()
    if not shape or len(shape[0]) != 3 or shape[0][1] != prefix + grid[0] * grid[1]:
        raise UserError(f"--cam: {model_name}'s tokens do not form the {grid[0]}x{grid[1]} patch grid; drop --cam")
    return [layer], reshape_transform


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Heatmaps:
    """One CAM method on one model: `maps(images, classes)` -> (B, H, W) in [0, 1], for the classes given."""

    def __init__(self, model: torch.nn.Module, model_name: str, pre, method: str = "gradcam"):
        """`pre`: the model's preprocessing (`data.Preprocess`: size, channels, mean, std)."""
        cam = grad_cam_module()
        if method not in METHODS:
            raise UserError(f"--cam-method {method!r} is not one of {', '.join(METHODS)}")
        self.pre = pre
        layers, reshape = target_layers(model, model_name, pre.imgsz, pre.in_chans)
        self.cam = getattr(cam, METHODS[method])(model=model, target_layers=layers, reshape_transform=reshape)

    def maps(self, images: torch.Tensor, classes: list[int]) -> np.ndarray:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with torch.enable_grad():  # callers run under no_grad; the CAM methods need the gradients
            return self.cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])

    def overlays(self, images: torch.Tensor, classes: list[int]) -> list[np.ndarray]:
        """Each preprocessed image with the heatmap of its class drawn over it: (H, W, 3) uint8 RGB each."""
        maps = self.maps(images, classes)
        mean, std = self.pre.mean, self.pre.std
        return [overlay(shown_image(image, mean, std), heat) for image, heat in zip(images, maps, strict=True)]

    def close(self) -> None:
        """Remove the hooks grad-cam put on the model."""
        self.cam.activations_and_grads.release()


def shown_image(tensor: torch.Tensor, mean, std) -> np.ndarray:
    """A preprocessed (C, H, W) image back to (H, W, 3) floats in [0, 1]: exactly the crop the model saw."""
    array = tensor.detach().float().cpu().numpy() * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    array = np.clip(array.transpose(1, 2, 0), 0.0, 1.0)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heatmap over the image (grad-cam's show_cam_on_image, jet colours): (H, W, 3) uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32), heatmap, use_rgb=True, image_weight=0.5)


def save_overlay(array: np.ndarray, path) -> None:
    """Write an overlay as PNG, enlarged (nearest) to at least 128 pixels so a 16-pixel image stays visible."""
    from PIL import Image

    image = Image.fromarray(array)
    scale = max(1, 128 // max(image.width, 1))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
