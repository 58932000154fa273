"""`trainer val`, `predict` and `export` on the weights of one real training run (trained once per session)."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_2PROC, ROOT, accelerate_launch, check, results, run, trainer
from safetensors import safe_open

from trainer.cli import main

TRAIN = ("train", "--data", "digits", "--imgsz", "16", "--epochs", "1", "--batch-size", "64", "--tracker", "none")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One tiny real run: resnet10t, 1 epoch on scikit-learn's digits at 16 px."""
    workdir = tmp_path_factory.mktemp("use")
    (workdir / "home").mkdir()
    check(run(trainer(*TRAIN), workdir))
    return workdir / "runs" / "train" / "exp"


@pytest.fixture
def in_process(monkeypatch, run_dir: Path) -> Path:
    """Run the CLI inside the test process (no interpreter start-up), from the run's working folder."""
    monkeypatch.chdir(run_dir.parents[2])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb"))  # the CLI may stub it out; undo after
    return run_dir.parents[2]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Twelve digit images as PNG files in a folder tree, plus a truncated PNG and a text file."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    digits = load_digits()
    for i in range(12):
        pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i % 2 else ".") / f"digit{i:02d}.png")
    whole = (folder / "digit00.png").read_bytes()
    (folder / "broken.png").write_bytes(whole[: len(whole) // 2])  # a cut-off download: header fine, pixels not
    (folder / "notes.txt").write_text("not an image and not named: skipped")
    return folder


def test_val_reproduces_training_metric_at_any_process_count(run_dir: Path):
    """The recorded val/top1 comes back; 2 ranks (with a padded last batch) give exactly the 1-rank numbers."""
    workdir = run_dir.parents[2]
    weights = run_dir / "weights" / "best.safetensors"
    one = check(run(trainer("val", "--weights", str(weights)), workdir))
    # 180 images in per-rank batches of 25: the shards end unevenly and gather_for_metrics must drop the padding.
    check(run(accelerate_launch(CPU_2PROC, "val", "--weights", str(weights), "--batch-size", "50"), workdir))
    val1, val2 = (workdir / "runs" / "val" / name for name in ("exp", "exp2"))
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (val1, val2))

    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    assert m1["images"] == m2["images"] == 180
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    recorded = float(results(run_dir)[int(meta["epoch"]) - 1]["val/top1"])
    assert m1["val/top1"] == pytest.approx(float(meta["val_top1"]), abs=1e-6)
    assert m1["val/top1"] == pytest.approx(recorded, abs=1e-5)
    assert (m2["val/top1"], m2["val/top5"]) == (m1["val/top1"], m1["val/top5"])
    assert m2["val/loss"] == pytest.approx(m1["val/loss"], rel=1e-6)
    assert (val1 / "per_class.csv").read_text() == (val2 / "per_class.csv").read_text()

    with open(val1 / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == [*(str(i) for i in range(10)), "all"]
    assert sum(int(r["images"]) for r in rows[:-1]) == 180
    assert (val1 / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "top1_acc" in one.stdout and f"top1 {m1['val/top1']:.4f}" in one.stdout

    # The worst mistakes: the same files in the same order at either process count (losses gathered in dataset order).
    top1, top2 = (list(csv.DictReader((d / "top_losses.csv").read_text().splitlines())) for d in (val1, val2))
    assert len(top1) == 16 and [r["index"] for r in top1] == [r["index"] for r in top2]
    assert [float(r["loss"]) for r in top1] == pytest.approx([float(r["loss"]) for r in top2], rel=1e-4)
    losses = [float(r["loss"]) for r in top1]
    assert losses == sorted(losses, reverse=True) and losses[0] > -np.log(0.5)  # a mistake, not a hesitation
    assert (val1 / "most_confused.csv").read_text() == (val2 / "most_confused.csv").read_text()
    confused = list(csv.DictReader((val1 / "most_confused.csv").read_text().splitlines()))
    wrong = sum(int(r["images"]) * (1 - float(r["top1"])) for r in rows[:-1])
    assert sum(int(r["count"]) for r in confused) == round(wrong)  # every mistake counted once, in some pair
    assert all(r["true"] != r["predicted"] for r in confused)
    assert (val1 / "top_losses.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "top_losses.png").is_file() and (run_dir / "most_confused.csv").is_file()  # training's too


def test_predict_folder_with_corrupt_file_matches_plain_timm(
    in_process: Path, run_dir: Path, image_folder: Path, capsys
):
    """A folder and a glob (overlapping), one corrupt file listed not fatal; the plain-timm snippet of docs/use.md
    (no trainer import) gives the same probabilities."""
    glob = str(image_folder / "sub" / "*.png")
    weights = str(run_dir / "weights" / "best.safetensors")
    assert (
        main(["predict", "--weights", weights, str(image_folder), glob, "--json", "--topk", "3", "--batch-size", "5"])
        == 0
    )
    out = capsys.readouterr().out
    skipped = out[out.index("1 file(s) skipped:") :].splitlines()[1]
    assert skipped.startswith(f"  {image_folder / 'broken.png'}: OSError")
    saved = in_process / "runs" / "predict" / "exp"
    report = json.loads((saved / "predictions.json").read_text())
    assert len(report["images"]) == 12  # each file once although the glob repeats the sub-folder
    assert [u["path"] for u in report["unreadable"]] == [str(image_folder / "broken.png")]
    with open(saved / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and list(rows[0])[:3] == ["path", "top1", "prob1"]
    assert [r["path"] for r in rows if r["error"]] == [str(image_folder / "broken.png")]

    snippet = docs_block("pretrained_cfg_overlay=overlay")
    assert "trainer" not in snippet
    scope: dict = {}
    exec(snippet, scope)  # loads runs/train/exp/weights/best.safetensors from the working folder
    from PIL import Image

    for image in report["images"]:
        pixels = scope["transform"](Image.open(image["path"]).convert("L"))
        with torch.no_grad():
            probs = scope["model"](pixels[None]).softmax(dim=1)[0]
        top = probs.topk(3)
        assert [p["index"] for p in image["predictions"]] == top.indices.tolist()
        assert [p["class"] for p in image["predictions"]] == [scope["classes"][i] for i in top.indices]
        assert [p["probability"] for p in image["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def _vit_weights(path: Path) -> Path:
    """An untrained test_vit (patch 16) at 32 px for digits' 10 classes, saved as trainer saves weights."""
    from trainer.config import ModelConfig
    from trainer.data import Preprocess
    from trainer.run.weights import save_weights, weights_metadata
    from trainer.train.model import build_model

    model = build_model(ModelConfig(model="test_vit"), 10, 1, imgsz=32)
    pre = Preprocess(imgsz=32, in_chans=1, mean=(0.5,), std=(0.5,), interpolation="bilinear", crop_pct=1.0)
    save_weights(model.state_dict(), path, weights_metadata("test_vit", [str(i) for i in range(10)], pre))
    return path


def test_cam_heatmaps_for_a_resnet_and_a_vit(in_process: Path, run_dir: Path, image_folder: Path, capsys):
    """predict --cam: one overlay per readable image (resnet10t's last stage whose map is 2x2 or more, a ViT's last
    block with its class token removed); val --cam: the top losses' heatmaps."""
    from PIL import Image

    vit = _vit_weights(in_process / "vit.safetensors")
    for name, weights in (("cam_resnet", run_dir / "weights" / "best.safetensors"), ("cam_vit", vit)):
        assert main(["predict", "--weights", str(weights), str(image_folder), "--cam", "--name", name]) == 0
        cam = in_process / "runs" / "predict" / name / "cam"  # own names: other tests look for runs/predict/exp
        assert sorted(p.name for p in cam.iterdir()) == sorted(f"digit{i:02d}.png" for i in range(12))
        with Image.open(cam / "digit00.png") as picture:
            assert picture.size == (128, 128) and picture.mode == "RGB"
            assert len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 4  # a heatmap, not one colour
    assert main(["val", "--weights", str(run_dir / "weights" / "best.safetensors"), "--cam", "--name", "cam"]) == 0
    with Image.open(in_process / "runs" / "val" / "cam" / "top_losses_cam.png") as picture:
        assert picture.format == "PNG" and picture.width >= 400
    capsys.readouterr()


def test_export_onnx_matches_onnxruntime(in_process: Path, run_dir: Path, capsys):
    """The ONNX file has a dynamic batch axis and gives PyTorch's logits within 1e-4 on real validation images."""
    import onnxruntime as ort

    from trainer import data
    from trainer.config import DataConfig
    from trainer.use.inference import load_model, read_weights

    weights = run_dir / "weights" / "best.safetensors"
    assert main(["export", "--weights", str(weights), "--check-images", "32"]) == 0
    out = capsys.readouterr().out
    reported = float(re.search(r"max \|logit diff\| (\S+)", out).group(1))
    assert reported <= 1e-4 and "checked on 32 validation images" in out

    session = ort.InferenceSession(str(run_dir / "weights" / "best.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 1, 16, 16]
    assert json.loads(session.get_modelmeta().custom_metadata_map["class_names"]) == [str(i) for i in range(10)]
    trained = read_weights(weights)
    splits, _ = data.load_splits(DataConfig(data="digits", imgsz=16))
    spec = data.LoaderSpec(data.Backend("torch", "test"), trained.pre, workers=0)
    images = next(iter(data.eval_loader(None, splits["val"], spec, 48))).images
    with torch.no_grad():
        expected = load_model(trained)(images).numpy()
    for batch in (images[:1], images[:7], images):
        logits = session.run(["logits"], {"images": batch.numpy()})[0]
        assert np.abs(logits - expected[: len(batch)]).max() <= 1e-4


def test_export_hf_folder_loads_in_timm(in_process: Path, run_dir: Path, capsys):
    import timm

    from trainer.use.inference import load_model, read_weights

    weights = run_dir / "weights" / "best.safetensors"
    folder = in_process / "exported"
    assert main(["export", "--weights", str(weights), "--format", "hf", "--output", str(folder)]) == 0
    assert "max |logit diff| 0.00e+00" in capsys.readouterr().out
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 10
    assert config["label_names"] == [str(i) for i in range(10)]
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16] and len(config["pretrained_cfg"]["mean"]) == 1
    assert "hf_hub_id" not in config["pretrained_cfg"]  # not timm's ImageNet weights: no borrowed identity
    umask = os.umask(0o022)
    os.umask(umask)
    # safetensors writes 0600; the exported files get the mode of any new file
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        p.name: 0o666 & ~umask for p in folder.iterdir()
    }
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert timm.data.resolve_data_config(model=model)["input_size"] == (1, 16, 16)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), load_model(read_weights(weights))(x))


def test_hub_push_needs_credentials(run_dir: Path):
    """Off by default; asked for without credentials (empty HOME, no HF_TOKEN) it stops with one line before
    writing anything."""
    workdir = run_dir.parents[2]
    weights = run_dir / "weights" / "best.safetensors"
    argv = ["export", "--weights", str(weights), "--format", "hf", "--output", "hub", "--push-to-hub", "me/x"]
    proc = run(trainer(*argv), workdir)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "trainer: error: --push-to-hub needs Hugging Face credentials: run `hf auth login` or set HF_TOKEN"
    ]
    assert not (workdir / "hub").exists()


def docs_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "use.md").read_text(), flags=re.S)
    return next(b for b in blocks if marker in b)
