"""Deploy anywhere, verified: one real run (test_resnet, digits at 32 px) exported to every CPU format; each export
passes `trainer val` within its bound of PyTorch and `predict` agrees on the top class; `benchmark` writes its
table; bad input is one line, exit 2, nothing overwritten. The CLI runs in-process (no interpreter start-ups)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import check, run, trainer

from trainer.cli import main

# 32 px, not 16: at 16 px test_resnet's last stage pools a 1x1 map, which OpenVINO's converter refuses.
TRAIN = ("train", "--data", "digits", "--model", "test_resnet", "--imgsz", "32", "--epochs", "3", "--batch-size", "32")
CPU_FORMATS = [  # (export flags, what it writes beside best.safetensors, precision)
    (["--format", "torchscript"], "best.torchscript", "fp32"),
    (["--format", "onnx"], "best.onnx", "fp32"),
    (["--format", "onnx", "--int8"], "best_int8.onnx", "int8"),
    (["--format", "openvino"], "best_openvino", "fp32"),
    (["--format", "openvino", "--int8"], "best_int8_openvino", "int8"),
]
BOUND_PP = {"fp32": 0.5, "int8": 2.0}  # docs/use.md


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One tiny real run (3 epochs, about 0.98 top-1) and twelve digit PNGs to predict."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("deploy")
    (root / "home").mkdir()
    check(run(trainer(*TRAIN, "--tracker", "none"), root))
    (root / "images").mkdir()
    digits = load_digits()
    for i in range(12):
        pixels = np.round(digits.images[100 + i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"digit{i:02d}.png")
    return root


@pytest.fixture
def here(monkeypatch, workdir: Path):
    """In the run's working folder, with accelerate's process-wide state fresh (val builds an Accelerator)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb"))  # the CLI may stub it out; undo after
    yield workdir
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


WEIGHTS = "runs/train/exp/weights/best.safetensors"


def _val(weights: str, name: str) -> dict:
    assert main(["val", "--weights", weights, "--name", name, "--exist-ok", "--workers", "0"]) == 0
    return json.loads(Path("runs/val", name, "metrics.json").read_text())


def _top_classes(weights: str, name: str) -> list[str]:
    argv = ["predict", "--weights", weights, "images", "--name", name, "--exist-ok", "--workers", "0"]
    assert main(argv) == 0
    with open(Path("runs/predict", name, "predictions.csv")) as f:
        return [row["top1"] for row in csv.DictReader(f)]


def test_every_cpu_format_is_verified_and_serves_val_and_predict(here: Path, capsys):
    """Each export prints PyTorch's and its own top-1 on the 180 validation images; `trainer val --weights EXPORT`
    gives the same top-1 within the bound, `predict` the same top class (every image for fp32)."""
    from trainer.use.inference import read_weights

    reference = _val(WEIGHTS, "pytorch")
    assert reference["val/top1"] > 0.8
    classes = _top_classes(WEIGHTS, "pytorch")
    for flags, name, precision in CPU_FORMATS:
        assert main(["export", "--weights", WEIGHTS, *flags]) == 0
        out = capsys.readouterr().out
        assert "checked on 180 validation images of builtin:digits through" in out
        line = next(line for line in out.splitlines() if line.startswith("checked on"))
        assert f"top-1 PyTorch {reference['val/top1']:.4f}, export" in line
        exported = f"runs/train/exp/weights/{name}"
        trained = read_weights(exported)  # the preprocessing and classes travel inside
        assert trained.class_names == [str(i) for i in range(10)] and trained.pre.imgsz == 32
        assert (trained.exported, trained.metadata["precision"]) == (flags[1], precision)
        metrics = _val(exported, name)
        assert abs(metrics["val/top1"] - reference["val/top1"]) * 100 <= BOUND_PP[precision], name
        assert f"as {flags[1]} {precision}" in capsys.readouterr().out  # val says what it ran
        agree = sum(a == b for a, b in zip(_top_classes(exported, name), classes, strict=True))
        assert agree == 12 if precision == "fp32" else agree >= 11, name
    ov = read_weights("runs/train/exp/weights/best_openvino")
    assert ov.metadata["inference_precision"] == "f32"  # explicit, never the CPU's bf16 default


def test_coreml_and_hub_folder_carry_their_description(here: Path, capsys):
    """CoreML converts on Linux and says it cannot run here; the hub folder has a timm-style model card."""
    from trainer.use.inference import read_weights

    assert main(["export", "--weights", WEIGHTS, "--format", "coreml"]) == 0
    assert "CoreML prediction needs macOS" in capsys.readouterr().out
    assert read_weights("runs/train/exp/weights/best.mlpackage").class_names == [str(i) for i in range(10)]
    assert main(["export", "--weights", WEIGHTS, "--format", "hf", "--check-images", "60"]) == 0
    card = Path("runs/train/exp/weights/best_hf/README.md").read_text()
    assert card.startswith("---\ntags:\n- image-classification\n- timm\n") and "library_name: timm" in card
    assert "on 60 validation images of builtin:digits" in card
    snippet = card[card.index("```python\n") + 10 : card.index("```\n", card.index("```python"))]
    scope: dict = {}
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(here / "image.jpg")
    exec(snippet, scope)  # the card's usage snippet runs as written, from the working folder
    assert scope["label_names"] == [str(i) for i in range(10)]


def test_benchmark_writes_one_table(here: Path, capsys):
    """Every asked format is a row; one that cannot run here is a row with its reason, not the end of the table."""
    argv = ["benchmark", "--weights", WEIGHTS, "--formats", "onnx,openvino-int8,engine", "--rounds", "1"]
    assert main([*argv, "--check-images", "64"]) == 0
    out = capsys.readouterr().out
    assert "format" in out and "ms/img (b1)" in out and "img/s (b32)" in out
    with open("runs/benchmark/exp/benchmark.csv") as f:
        rows = {row["format"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["pytorch", "onnx", "openvino-int8", "engine"]
    for name in ("pytorch", "onnx", "openvino-int8"):
        assert rows[name]["status"] == "ok" and float(rows[name]["imgs_per_sec"]) > 0
        assert float(rows[name]["ms_per_img"]) > 0 and float(rows[name]["size_mb"]) > 0
    assert abs(float(rows["onnx"]["delta_pp"])) <= 0.5
    assert rows["engine"]["status"].startswith("failed: --format engine builds a TensorRT engine")
    assert (here / "runs/benchmark/exp/best_int8_openvino/model.xml").is_file()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "runs/train").rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["export", "--weights", WEIGHTS, "--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
        (["benchmark", "--weights", WEIGHTS, "--formats", "onnx,tflite"], "--formats tflite: unknown format"),
        (["export", "--weights", WEIGHTS, "--format", "engine"], "--format engine builds a TensorRT engine for"),
        (["export", "--weights", "loose.safetensors", "--int8"], "--int8 calibrates on training images, but"),
        (["val", "--weights", "damaged.onnx"], "--weights damaged.onnx: not a readable onnx export (DecodeError"),
        (["predict", "--weights", "damaged.torchscript", "images"], "not a readable torchscript export (BadZipFile"),
        (["export", "--weights", WEIGHTS, "--format", "hf", "--int8"], "--int8 is for --format onnx or openvino"),
        (["export", "--weights", WEIGHTS, "--half"], "--format onnx --half traces the model in fp16 on a GPU"),
    ],
    ids=[
        "unknown-format",
        "unknown-benchmark-format",
        "engine-on-cpu",
        "int8-no-data",
        "damaged-onnx",
        "damaged-torchscript",
        "int8-hf",
        "half-onnx-cpu",
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_overwritten(here: Path, capsys, argv, expected):
    shutil.copy(WEIGHTS, "loose.safetensors")  # no run folder around it: no data to calibrate on
    Path("damaged.onnx").write_bytes(b"\x08\x07garbage" * 10)
    Path("damaged.torchscript").write_bytes(b"PK not really a zip")
    before = _snapshot(here)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("trainer: error: ") and expected in err[0], err
    assert _snapshot(here) == before
