"""What an exported model is called and what travels inside it.

Every artifact carries the metadata of the weights it came from (model name, classes, preprocessing, task,
threshold, epoch, recorded metric) plus `format`, `precision` and its source (`source_weights`, `source_run`):
ONNX metadata_props, OpenVINO rt_info (["trainer", "metadata"], one JSON object), TorchScript `_extra_files`
(trainer.json), CoreML user metadata, and for a TensorRT engine (a bare plan file) a sidecar `best.engine.json`.
So `trainer val` / `predict` rebuild the run's preprocessing from the artifact alone.

Light at import: no runtime is loaded until a file is read.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trainer.config import UserError

FORMATS = ("torchscript", "onnx", "openvino", "engine", "coreml", "hf")
INT8_FORMATS = ("onnx", "openvino")
# beside best.safetensors: best.torchscript, best.onnx, best_int8.onnx, best_openvino/, ...
SUFFIXES = {
    ("torchscript", False): ".torchscript",
    ("onnx", False): ".onnx",
    ("onnx", True): "_int8.onnx",
    ("openvino", False): "_openvino",
    ("openvino", True): "_int8_openvino",
    ("engine", False): ".engine",
    ("coreml", False): ".mlpackage",
    ("hf", False): "_hf",
}
OPENVINO_XML = "model.xml"
TORCHSCRIPT_EXTRA = "trainer.json"
COPIED_KEYS = ("model_name", "class_names", "imgsz", "in_chans", "mean", "std", "interpolation", "crop_pct")
COPIED_KEYS += ("epoch", "val_top1", "val_map", "task", "output", "threshold")


def need(module: str, extra: str, what: str):
    """Import `module` or stop with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f'pip install -e ".[{extra}]" in the trainer checkout'
        raise UserError(f"{what} needs {module.split('.')[0]} ({hint})") from e


@dataclass(frozen=True)
class Target:
    """One export: a format and its precision (`int8`, `half`, `bf16`: the last only for OpenVINO)."""

    fmt: str
    int8: bool = False
    half: bool = False
    bf16: bool = False

    @property
    def precision(self) -> str:
        """What the numbers are stored and run in: fp32, fp16, bf16 or int8."""
        return "int8" if self.int8 else "fp16" if self.half else "bf16" if self.bf16 else "fp32"

    @property
    def label(self) -> str:
        """`onnx`, `openvino-int8`, ...: the name `trainer benchmark --formats` takes."""
        return self.fmt if self.precision == "fp32" else f"{self.fmt}-{self.precision}"

    def path_for(self, weights: Path, folder: Path | None = None, distinct: bool = False) -> Path:
        """best.safetensors -> best_int8.onnx etc., beside the weights or in `folder`. `distinct` (benchmark, which
        writes several precisions of one format side by side): best_bf16_openvino/, best_fp16.engine, ..."""
        tag = f"_{self.precision}" if distinct and self.precision in ("bf16", "fp16") else ""
        return (folder or weights.parent) / (weights.stem + tag + SUFFIXES[(self.fmt, self.int8)])

    @classmethod
    def parse(cls, label: str) -> Target:
        """`openvino-int8` -> Target("openvino", int8=True)."""
        fmt, _, precision = label.partition("-")
        options = {"": {}, "fp32": {}, "int8": {"int8": True}, "fp16": {"half": True}, "bf16": {"bf16": True}}
        if fmt not in FORMATS or fmt == "hf" or precision not in options:
            known = "torchscript, onnx, onnx-int8, openvino, openvino-bf16, openvino-fp16, openvino-int8, engine, "
            known += "engine-fp16, coreml"
            raise UserError(f"--formats {label}: unknown format; known: {known}")
        return cls(fmt, **options[precision])


def artifact_metadata(metadata: dict[str, str], source: Path, target: Target) -> dict[str, str]:
    """The strings every artifact carries: the weights' own description, the format, the precision, the source."""
    meta = {k: metadata[k] for k in COPIED_KEYS if k in metadata}
    if metadata.get("test_imgsz"):  # --test-imgsz: the graph takes the test size; the training size kept beside it
        meta["imgsz"], meta["train_imgsz"] = metadata["test_imgsz"], metadata["imgsz"]
    meta.update(export_format=target.fmt, precision=target.precision, source_weights=str(source.resolve()))
    run_dir = source.resolve().parent.parent
    if (run_dir / "config.yaml").is_file():
        meta["source_run"] = str(run_dir)
    return meta


def artifact_kind(path: Path) -> str:
    """Which format `--weights PATH` is, from its name (and for a folder, its contents)."""
    name = path.name.lower()
    if path.is_dir():
        if (path / OPENVINO_XML).is_file() or any(path.glob("*.xml")):
            return "openvino"
        if name.endswith(".mlpackage"):
            return "coreml"
        raise UserError(f"--weights {path}: a folder, but not an OpenVINO export (no {OPENVINO_XML} in it)")
    for suffix, kind in ((".onnx", "onnx"), (".torchscript", "torchscript"), (".engine", "engine")):
        if name.endswith(suffix):
            return kind
    if name.endswith(".xml"):
        return "openvino"
    return "safetensors"


def read_artifact_metadata(path: Path, kind: str) -> dict[str, str]:
    """The metadata inside an exported model (see the module docstring for where each format keeps it)."""
    if not path.exists():
        raise UserError(f"--weights {path}: no such file or folder")
    try:
        meta = _READERS[kind](path)
    except UserError:
        raise
    except Exception as e:  # each runtime's parser raises its own types for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--weights {path}: not a readable {kind} export ({type(e).__name__}: {first})") from e
    if meta.get("export_format") is None:
        meta["export_format"] = kind
    return meta


def _onnx(path: Path) -> dict[str, str]:
    onnx = need("onnx", "export", "reading an ONNX model")
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def openvino_xml(path: Path) -> Path:
    return path if path.suffix == ".xml" else path / OPENVINO_XML


def _openvino(path: Path) -> dict[str, str]:
    ov = need("openvino", "export", "reading an OpenVINO model")
    model = ov.Core().read_model(str(openvino_xml(path)))
    if not model.has_rt_info(["trainer", "metadata"]):
        return {}
    return json.loads(model.get_rt_info(["trainer", "metadata"]).astype(str))


def _torchscript(path: Path) -> dict[str, str]:
    # A TorchScript file is a zip archive: read the extra file without loading (running) the program.
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_EXTRA}")), None)
        return json.loads(archive.read(name)) if name else {}


def engine_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _engine(path: Path) -> dict[str, str]:
    sidecar = engine_sidecar(path)
    if not sidecar.is_file():
        raise UserError(f"--weights {path}: its metadata file {sidecar.name} is missing; export it again")
    return json.loads(sidecar.read_text())


def _coreml(path: Path) -> dict[str, str]:
    ct = need("coremltools", "coreml", "reading a CoreML model")
    return dict(ct.models.MLModel(str(path), skip_model_load=True).user_defined_metadata)


_READERS = {"onnx": _onnx, "openvino": _openvino, "torchscript": _torchscript, "engine": _engine, "coreml": _coreml}
