"""The timm hub folder (`best_hf/`: config.json, model.safetensors, README.md) and its upload.

The model card is written by timm's own `generate_readme`, the function `push_to_hf_hub` uses: front matter with
`library_name: timm`, tags and licence; then the model, its data, the metrics measured on the validation split, the
preprocessing and a usage snippet that loads the folder (or the hub repo) in plain timm.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.config import UserError
from trainer.run.weights import match_umask
from trainer.use.inference import TrainedWeights

CARD = "README.md"


def hf_model_config(trained: TrainedWeights) -> tuple[dict, dict]:
    """(model_config, data_config) for timm's save_for_hf: label names and the training-time preprocessing."""
    pre = trained.pre
    data_config = {
        "input_size": (pre.in_chans, pre.imgsz, pre.imgsz),
        "interpolation": pre.interpolation,
        "mean": pre.mean,
        "std": pre.std,
        "crop_pct": pre.crop_pct,
        "crop_mode": "center",
    }
    return {"label_names": trained.class_names}, data_config


def _clean_pretrained_cfg(model: torch.nn.Module, trained: TrainedWeights) -> None:
    # The model still carries timm's config of its ImageNet weights (tag, hub id, licence): not these weights.
    keep = ("architecture", "first_conv", "classifier", "fixed_input_size")
    pre = trained.pre
    model.pretrained_cfg = {
        **{k: v for k, v in model.pretrained_cfg.items() if k in keep},
        "input_size": (pre.in_chans, pre.imgsz, pre.imgsz),
    }


def export_hf(model: torch.nn.Module, trained: TrainedWeights, out: Path) -> torch.nn.Module:
    """timm's hub layout (config.json + model.safetensors) in `out`; returns the model timm reloads from it."""
    import timm
    from timm.models import save_for_hf

    _clean_pretrained_cfg(model, trained)
    model_config, data_config = hf_model_config(trained)
    save_for_hf(model, str(out), model_config=model_config, data_config=data_config, safe_serialization=True)
    match_umask(out)
    return timm.create_model(f"local-dir:{out}", pretrained=True).eval()


def model_card(
    trained: TrainedWeights, model: torch.nn.Module, measured: str, data_source: str, folder: str, repo_id: str | None
) -> str:
    """README.md in timm's push_to_hf_hub form (timm.models._hub.generate_readme)."""
    from timm.models._hub import generate_readme

    pre = trained.pre
    meta = trained.metadata
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    details = {
        "Model Type": "Image classification" + (" (multi-label: a sigmoid per label)" if trained.multilabel else ""),
        "Architecture": f"{trained.model_name} (timm)",
        "Model Stats": {
            "Params (M)": f"{params_m:.2f}",
            "Image size": f"{pre.in_chans} x {pre.imgsz} x {pre.imgsz}",
            "Classes": f"{trained.num_classes}: {', '.join(trained.class_names[:20])}"
            + (" ..." if trained.num_classes > 20 else ""),
        },
        "Dataset": data_source or "unknown",
        "Training": f"trainer, epoch {meta.get('epoch', '?')}",
        "Metrics": measured or "not measured (no validation data named)",
        "Preprocessing": {
            "resize": f"shorter side to {round(pre.imgsz / pre.crop_pct)} ({pre.interpolation}), centre crop "
            f"{pre.imgsz} (crop_pct {pre.crop_pct:g})",
            "normalise": f"mean {list(pre.mean)}, std {list(pre.std)}",
        },
    }
    source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder}"
    usage = f"""### Image classification
```python
import timm, torch
from PIL import Image

model = timm.create_model("{source}", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)
image = Image.open("image.jpg").convert("{"L" if pre.in_chans == 1 else "RGB"}")
with torch.no_grad():
    logits = model(transform(image).unsqueeze(0))
label_names = model.pretrained_cfg["label_names"]
{{multi_or_single}}
```
"""
    if trained.multilabel:
        lines = f"print([label_names[i] for i, p in enumerate(logits.sigmoid()[0]) if p > {trained.threshold:g}])"
    else:
        lines = "probs, classes = logits.softmax(dim=1).topk(min(5, len(label_names)))\n"
        lines += "print([(label_names[c], round(float(p), 4)) for p, c in zip(probs[0], classes[0])])"
    usage = usage.replace("{multi_or_single}", lines)
    card = {
        "tags": ["image-classification", "timm", "trainer"],
        "license": "other",
        "description": f"A {trained.model_name} image classifier trained with trainer (timm + Accelerate).",
        "details": details,
        "usage": usage,
    }
    return generate_readme(card, trained.model_name)


def write_card(out: Path, text: str) -> None:
    (out / CARD).write_text(text)
    match_umask(out / CARD)


def check_hub_credentials() -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("--push-to-hub needs Hugging Face credentials: run `hf auth login` or set HF_TOKEN")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        raise UserError("--push-to-hub needs the network but HF_HUB_OFFLINE is set; unset it")


def push(model: torch.nn.Module, trained: TrainedWeights, repo_id: str, card_text: str) -> str:
    """Upload with timm's push_to_hf_hub; our model card replaces the one it would generate."""
    from huggingface_hub import upload_file
    from timm.models import push_to_hf_hub

    model_config, data_config = hf_model_config(trained)
    try:
        push_to_hf_hub(model, repo_id, model_config=model_config, data_config=data_config, safe_serialization=True)
        upload_file(path_or_fileobj=card_text.encode(), path_in_repo=CARD, repo_id=repo_id)
    except Exception as e:  # hub errors (auth, network, permissions) come in many types; one line each
        raise UserError(f"--push-to-hub {repo_id}: {type(e).__name__}: {e}".split("\n")[0]) from e
    return f"https://huggingface.co/{repo_id}"
