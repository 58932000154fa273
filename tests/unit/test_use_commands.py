"""val / predict / export without a training run: weights metadata back to a model, finding images, errors."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from trainer.cli import main
from trainer.config import UserError
from trainer.data import Preprocess
from trainer.run.weights import save_weights, weights_metadata
from trainer.use.inference import data_config_for, load_model, read_weights
from trainer.use.predict import find_images, read_predictions_csv

PRE = Preprocess(imgsz=24, in_chans=1, mean=(0.449,), std=(0.226,), interpolation="bicubic", crop_pct=0.875)
CLASSES = ["cat", "dog", "ému"]


@pytest.fixture
def weights(tmp_path):
    """A weights file as `trainer train` writes it, in RUN/weights/ with RUN/config.yaml beside it."""
    import timm

    model = timm.create_model("resnet10t", num_classes=3, in_chans=1)
    run_dir = tmp_path / "run"
    (run_dir / "weights").mkdir(parents=True)
    config = {"data": {"data": "digits", "imgsz": 24, "split_seed": 7}, "launch": {"num_processes": 2}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    path = run_dir / "weights" / "best.safetensors"
    save_weights(model.state_dict(), path, weights_metadata("resnet10t", CLASSES, PRE, epoch=3, val_top1=0.5))
    return path, model


@pytest.fixture(autouse=True)
def _cli_side_effects(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb"))  # the CLI may stub it out; undo after


def test_weights_metadata_rebuilds_model_and_preprocessing(weights):
    path, model = weights
    trained = read_weights(path)
    assert (trained.model_name, trained.class_names, trained.pre) == ("resnet10t", CLASSES, PRE)
    assert trained.describe() == "resnet10t, epoch 3 (recorded val/top1 0.5000)"
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(load_model(trained)(x), model.eval()(x))


def test_data_defaults_to_the_runs_own(weights, tmp_path):
    path, _ = weights
    trained = read_weights(path)
    cfg = data_config_for(trained, None)
    assert (cfg.data, cfg.split_seed, cfg.imgsz) == ("digits", 7, 24)
    assert data_config_for(trained, "mnist").data == "mnist"  # --data replaces the dataset, keeps the split seed
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes(path.read_bytes())  # no run folder around it
    assert data_config_for(read_weights(loose), None) is None
    assert data_config_for(read_weights(loose), "digits").imgsz == 24  # image size always from the weights


def test_find_images_files_folders_globs(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.png", "a/deep/y.JPG", "a/notes.txt", "b.webp", "named.dat"):
        (tmp_path / name).write_bytes(b"")
    sources = [str(tmp_path / "a"), str(tmp_path / "*.webp"), str(tmp_path / "named.dat"), str(tmp_path / "a/x.png")]
    found, missing = find_images([*sources, str(tmp_path / "gone.png"), str(tmp_path / "*.gif")])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/deep/y.JPG", "a/x.png", "b.webp", "named.dat"]  # each once; a named file whatever its suffix
    assert [(m.path.rsplit("/", 1)[-1], m.error) for m in missing] == [
        ("gone.png", "no such file or folder"),
        ("*.gif", "no file matches this pattern"),
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["val", "--weights", "nothere.safetensors"], "--weights nothere.safetensors: no such file"),
        (["predict", "--weights", "w.safetensors", "x.png", "--topk", "0"], "expects a positive integer, got 0"),
        (["predict", "x.png"], "the following arguments are required: --weights"),
        (["export", "--weights", "w.safetensors", "--format", "tflite"], "invalid choice: 'tflite'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("trainer: error: ") and expected in err[0], err


def test_errors_about_the_weights_and_their_run(weights, tmp_path, capsys, fresh_accelerate_state):
    path, _ = weights
    not_weights = tmp_path / "photo.safetensors"
    not_weights.write_bytes(b"\x89PNG not tensors")
    bare = tmp_path / "bare.safetensors"
    save_weights({"w": torch.zeros(1)}, bare, {"format": "pt"})
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes(path.read_bytes())
    cases = [
        (["export", "--weights", str(not_weights)], "not a readable .safetensors file"),
        (["predict", "--weights", str(bare), str(tmp_path)], "lacks trainer metadata (model_name, class_names"),
        (["val", "--weights", str(loose)], "to say which data it was trained on; pass --data"),
        (["predict", "--weights", str(path), str(tmp_path / "empty")], "no images found"),
        (["predict", "--weights", str(path), str(tmp_path), "--threshold", "0.3"], "--threshold applies to multi-"),
        (["export", "--weights", str(path), "--push-to-hub", "me/x"], "uploads the hf format; add --format hf"),
        (["val", "--weights", str(path)], "--data digits has classes [0, 1, 2, 3, 4, ... (10 in all)] but"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    with pytest.raises(UserError):
        main(["val", "--weights", str(loose), "--debug"])


def test_help_of_each_command(capsys):
    for command, flags in [
        ("val", ("--weights", "--data", "--split", "--batch-size")),
        ("predict", ("--weights", "SOURCE", "--topk", "--json")),
        ("export", ("--weights", "--format", "--output", "--push-to-hub")),
    ]:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), out


def test_multilabel_predictions_csv_reads_back_names_with_spaces_and_commas(tmp_path, monkeypatch, capsys):
    """Label names holding a space, a comma or a quote come back from predictions.csv exactly (joined by spaces,
    `big dog` and `big` + `dog` were one cell)."""
    import json

    import numpy as np
    import timm
    from PIL import Image

    names = ["big dog", "big", "dog", "a,b", 'say "hi"']
    model = timm.create_model("resnet10t", num_classes=len(names), in_chans=1)
    meta = weights_metadata("resnet10t", names, PRE, task="multilabel", output="sigmoid", threshold="0.5")
    save_weights(model.state_dict(), tmp_path / "tags.safetensors", meta)
    rng = np.random.default_rng(0)
    for n in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(tmp_path / f"i{n}.png")
    monkeypatch.chdir(tmp_path)
    argv = ["predict", "--weights", "tags.safetensors", "i0.png", "i1.png", "i2.png", "--threshold", "0.001"]
    assert main([*argv, "--json", "--workers", "0"]) == 0
    back = read_predictions_csv(tmp_path / "runs" / "predict" / "exp" / "predictions.csv")
    report = json.loads((tmp_path / "runs" / "predict" / "exp" / "predictions.json").read_text())
    assert len(back) == 3
    for image in report["images"]:
        pairs = back[image["path"]]
        assert sorted(name for name, _ in pairs) == sorted(names)  # every label above 0.001, each name whole
        assert [name for name, _ in pairs] == [p["class"] for p in image["predictions"]]
        assert [p for _, p in pairs] == pytest.approx([p["probability"] for p in image["predictions"]], abs=1e-6)


def test_val_warns_when_the_runs_hold_out_moved(tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    """`val` on the run's own held-out validation after images were added (the run recorded 1,497 + 166 images,
    digits has 1,617 + 180 now): the hold-out is drawn anew from other images, some of them trained on: one warning
    line, also in metrics.json. The run's own sizes: no warning."""
    import json

    import timm

    pre = Preprocess(imgsz=16, in_chans=1, mean=(0.5,), std=(0.5,), interpolation="bilinear", crop_pct=1.0)
    run_dir = tmp_path / "run"
    (run_dir / "weights").mkdir(parents=True)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    path = run_dir / "weights" / "best.safetensors"
    save_weights(model.state_dict(), path, weights_metadata("test_resnet", [str(i) for i in range(10)], pre))
    held = "0.1 of train held out, stratified by class, --split-seed 0"
    monkeypatch.chdir(tmp_path)
    for (train, val), warned in (((1497, 166), True), ((1617, 180), False)):
        record = {"data": {"data": "digits", "imgsz": 16}, "dataset": {"train_size": train, "val_size": val}}
        record["dataset"]["val_split"] = held
        (run_dir / "config.yaml").write_text(yaml.safe_dump(record))
        assert main(["val", "--weights", str(path), "--workers", "0", "--exist-ok"]) == 0
        out = capsys.readouterr().out
        assert ("the run held out its validation from 1663 images (166 val)" in out) == warned, out
        metrics = json.loads((tmp_path / "runs" / "val" / "exp" / "metrics.json").read_text())
        assert ("warning" in metrics) == warned and metrics["images"] == 180
