"""Trained weights back into a model: what `trainer val`, `predict` and `export` share.

A weights file written by a run carries its own description in the safetensors metadata (model name, classes,
preprocessing); the run's config.yaml beside it (RUN/weights/best.safetensors -> RUN/config.yaml) says which data
it was trained and validated on. An exported model (best.onnx, best_openvino/, best.torchscript, ...) carries the
same description inside it (trainer.use.export.artifacts) and loads into its own runtime (trainer.use.export.runtimes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from trainer.config import DataConfig, UserError, build_config, load_yaml
from trainer.data import Preprocess
from trainer.run.layout import CONFIG_FILE, WEIGHTS
from trainer.train.tasks import Task

REQUIRED_KEYS = ("model_name", "class_names", "imgsz", "in_chans", "mean", "std", "interpolation", "crop_pct")


@dataclass(frozen=True)
class TrainedWeights:
    """A weights file and what its metadata says about it."""

    path: Path
    model_name: str
    class_names: list[str]
    pre: Preprocess
    metadata: dict[str, str]

    @property
    def train_imgsz(self) -> int:
        """The size the model was trained at (at the end of a --progressive ramp); `pre.imgsz` is the size it is
        evaluated at: the recorded --test-imgsz, else this one."""
        return int(self.metadata["imgsz"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        """Whether the outputs are one sigmoid per label (weights from a multi-label run) rather than a softmax."""
        return self.metadata.get("task") == "multilabel"

    @property
    def threshold(self) -> float:
        """The probability above which a label counts as predicted (multi-label weights; 0.5 when unrecorded)."""
        return float(self.metadata.get("threshold", 0.5))

    def task(self):
        """The `train.tasks.Task` these weights were trained for (its validation loss, metrics and threshold)."""
        return Task(multilabel=self.multilabel, num_classes=self.num_classes, threshold=self.threshold)

    @property
    def exported(self) -> str:
        """The export format ("onnx", "openvino", ...) of an exported model; "" for a .safetensors file."""
        return self.metadata.get("export_format", "")

    def describe(self) -> str:
        """`resnet10t, epoch 4 (val/top1 0.9840)` as far as the metadata tells (`, as onnx int8` for an export)."""
        text = self.model_name
        if "epoch" in self.metadata:
            text += f", epoch {self.metadata['epoch']}"
        if "val_top1" in self.metadata:
            text += f" (recorded val/top1 {float(self.metadata['val_top1']):.4f})"
        elif "val_map" in self.metadata:
            text += f" (recorded val/map {float(self.metadata['val_map']):.4f})"
        if self.exported:
            text += f", as {self.exported} {self.metadata.get('precision', '')}".rstrip()
        return text


def read_weights(path: str | Path) -> TrainedWeights:
    """Read and check the metadata of a weights file written by `trainer train`, or of a model exported from one."""
    from trainer.use.export.artifacts import artifact_kind, read_artifact_metadata

    file = Path(path)
    kind = artifact_kind(file)
    if kind != "safetensors":
        return weights_from_metadata(file, read_artifact_metadata(file, kind))
    if not file.is_file():
        raise UserError(f"--weights {path}: no such file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"--weights {path}: not a readable .safetensors file ({e})".split("\n")[0]) from e
    return weights_from_metadata(file, meta)


def weights_from_metadata(file: Path, meta: dict[str, str]) -> TrainedWeights:
    """Check the metadata trainer writes (into weights files and exported models) and parse it."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise UserError(
            f"--weights {file}: lacks trainer metadata ({', '.join(missing)}); pass a weights file written by "
            "trainer train (RUN/weights/best.safetensors) or a model trainer export wrote"
        )
    try:
        pre = Preprocess(
            imgsz=int(meta.get("test_imgsz") or meta["imgsz"]),  # FixRes: the run's --test-imgsz, when it had one
            in_chans=int(meta["in_chans"]),
            mean=tuple(json.loads(meta["mean"])),
            std=tuple(json.loads(meta["std"])),
            interpolation=meta["interpolation"],
            crop_pct=float(meta["crop_pct"]),
        )
        class_names = [str(c) for c in json.loads(meta["class_names"])]
    except (ValueError, TypeError) as e:
        raise UserError(f"--weights {file}: damaged metadata ({e})") from e
    return TrainedWeights(file, meta["model_name"], class_names, pre, meta)


def load_model(weights: TrainedWeights) -> torch.nn.Module:
    """The timm model of a weights file, with those weights, in eval mode on the CPU; for an exported model, a module
    that runs it through its own runtime (onnxruntime, OpenVINO, TorchScript, TensorRT), logits out."""
    if weights.exported:
        from trainer.use.export.runtimes import load_runtime

        return load_runtime(weights.path, weights.metadata)
    from safetensors.torch import load_file

    from trainer.config import ModelConfig
    from trainer.train.model import build_model

    model = build_model(
        ModelConfig(model=weights.model_name),
        weights.num_classes,
        weights.pre.in_chans,
        imgsz=weights.train_imgsz,
        sizes={weights.pre.imgsz: f"its recorded test_imgsz {weights.pre.imgsz}"},
    )
    try:
        model.load_state_dict(load_file(weights.path))
    except RuntimeError as e:  # key or shape mismatch: not the model the metadata names
        raise UserError(
            f"--weights {weights.path}: tensors do not fit {weights.model_name} ({e})".split("\n")[0]
        ) from e
    return model.eval()


def run_dir_of(weights: TrainedWeights) -> Path | None:
    """RUN for RUN/weights/X.safetensors when RUN/config.yaml exists; for a model exported elsewhere, the run it
    records as its source."""
    run_dir = weights.path.resolve().parent.parent
    if weights.path.resolve().parent.name == WEIGHTS and (run_dir / CONFIG_FILE).is_file():
        return run_dir
    source = weights.metadata.get("source_run")
    if source and (Path(source) / CONFIG_FILE).is_file():
        return Path(source)
    return None


def data_config_for(weights: TrainedWeights, data: str | None) -> DataConfig | None:
    """The data the weights were trained on (from the run's config.yaml), `data` replacing the dataset name.

    The image size always comes from the weights. None when there is neither a run config nor `data`.
    """
    run_dir = run_dir_of(weights)
    if run_dir is not None:
        values = load_yaml(str(run_dir / CONFIG_FILE))
        cfg = build_config({"data": values.get("data", {})}).data
        kind = _recorded_source(run_dir / CONFIG_FILE).split(":", 1)[0]
        if data is None and kind in ("folder", "files", "webdataset") and not Path(cfg.data).expanduser().exists():
            # A local dataset that moved or was deleted: not a hub id to download (the run read it from disk).
            raise UserError(
                f"the run's data {cfg.data} ({kind}, from {run_dir / CONFIG_FILE}) is not there any more (no such "
                "file or folder from here); pass --data with where it is now"
            )
    elif data is None:
        return None
    else:
        cfg = DataConfig()
    return replace(cfg, data=data or cfg.data, imgsz=weights.pre.imgsz)


def _recorded_source(config_file: Path) -> str:
    """`dataset.source` as the run wrote it (`folder:pets`, `hub:user/set`, ...); "" when it says nothing."""
    return str(recorded_dataset(config_file).get("source", ""))


def recorded_dataset(config_file: Path) -> dict:
    """The `dataset:` record of a run's config.yaml (source, sizes, where validation came from); {} without one."""
    import yaml

    try:
        record = (yaml.safe_load(config_file.read_text()) or {}).get("dataset") or {}
        return record if isinstance(record, dict) else {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}


def check_classes(weights: TrainedWeights, class_names: list[str], data_name: str) -> None:
    """Refuse data whose classes differ from the ones the model was trained on."""
    if list(class_names) != weights.class_names:
        raise UserError(
            f"--data {data_name} has classes {_short(class_names)} but {weights.path.name} was trained on "
            f"{_short(weights.class_names)}; pass the data it was trained on"
        )


def _short(names: list[str]) -> str:
    return "[" + ", ".join(names[:5]) + (f", ... ({len(names)} in all)]" if len(names) > 5 else "]")
