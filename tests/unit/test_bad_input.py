"""The errors table of docs/errors.md: every mistake is one line on stderr, exit code 2, no traceback, nothing written.

Each case runs the real CLI in-process next to an existing run folder and checks that folder is left as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from trainer.cli import main
from trainer.config import Config

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
FAST = ["--data", "digits", "--imgsz", "16", "--epochs", "1", "--batch-size", "64"]


# A valid 1x1 grey PNG.
PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b550000000a4944415478da63f80f00010101"
    "001b5ba6e50000000049454e44ae426082"
)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _existing_run(root: Path) -> None:
    """A run folder as a finished 1-epoch run leaves it (config, results, weights, a checkpoint)."""
    run_dir = root / "runs" / "train" / "exp"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-25").mkdir(parents=True)
    record = Config().to_dict()
    record["data"].update(data="digits", imgsz=16)
    record["train"].update(epochs=1, batch_size=64)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record))
    (run_dir / "results.csv").write_text("epoch,train/loss,val/loss,val/top1,val/top5,lr\n1,1,1,0.5,0.9,0.001\n")
    (run_dir / "weights" / "last.safetensors").write_bytes(b"weights")
    (run_dir / "checkpoints" / "step-25" / "trainer_state_0.json").write_text("{not json")  # damaged
    (root / "bad.yaml").write_text("train:\n  epochs: [1\n")
    (root / "typo.yaml").write_text("train:\n  epoch: 3\n")
    (root / "garbage.pth").write_bytes(b"\x00not a checkpoint")
    torch.save({"fc.weight": Payload(root / "pwned")}, root / "payload.pth")
    (root / "norun").mkdir()
    tagged = {"tags_missing": "a.png,1 2\nb.png,2\nc.png,1\n", "tags_empty": "a.png,1\nb.png,\n"}
    tagged["tags_twice"] = "a.png,1\nb.png,2\na.png,2\n"  # conflicting labels for one file
    for name, rows in tagged.items():
        (root / name).mkdir()
        for image in ("a.png", "b.png"):
            (root / name / image).write_bytes(PNG_1PX)
        (root / name / "labels.csv").write_text("filename,labels\n" + rows)
    for split, rows in (("train", "a.png,1\nb.png,2\n"), ("val", "../train/a.png,1\n")):  # a.png on both sides
        (root / "tags_both" / split).mkdir(parents=True)
        (root / "tags_both" / split / "labels.csv").write_text(rows)
        for image in ("a.png", "b.png"):
            (root / "tags_both" / split / image).write_bytes(PNG_1PX)
    for name in ("caf\u00e9", "cafe\u0301", "tea"):  # NFC and NFD spellings of one name, and another class
        (root / "accents" / name).mkdir(parents=True)
        for n in range(10):
            (root / "accents" / name / f"{n}.png").write_bytes(PNG_1PX)
    _teacher_files(root)
    _inspect_files(root)


def _teacher_files(root: Path) -> None:
    """Teachers that do not fit digits at --imgsz 16: 5 classes; trained at 32 px; a ResNet's tensors (no metadata)."""
    import timm
    from safetensors.torch import save_file

    for name, classes, imgsz in (("teacher5", 5, 16), ("teacher32", 10, 32)):
        state = timm.create_model("test_resnet", num_classes=classes, in_chans=1).state_dict()
        meta = {"model_name": "test_resnet", "num_classes": str(classes), "imgsz": str(imgsz)}
        save_file(state, str(root / f"{name}.safetensors"), metadata=meta)
    torch.save(state, root / "resnet.pth")


def _inspect_files(root: Path) -> None:
    """For audit and --cam: a folder with 3 images per class (too few for 5 folds), weights of a model whose stages
    are no spatial map (test_mambaout: channels last)."""
    from trainer.config import ModelConfig
    from trainer.data import Preprocess
    from trainer.run.weights import save_weights, weights_metadata
    from trainer.train.model import build_model

    for split, count in (("train", 3), ("val", 1)):
        for label in ("a", "b"):
            (root / "tiny" / split / label).mkdir(parents=True)
            for i in range(count):
                (root / "tiny" / split / label / f"{i}.png").write_bytes(PNG_1PX)
    model = build_model(ModelConfig(model="test_mambaout"), 10, 1, imgsz=32)
    pre = Preprocess(imgsz=32, in_chans=1, mean=(0.5,), std=(0.5,), interpolation="bilinear", crop_pct=1.0)
    names = [str(i) for i in range(10)]
    save_weights(model.state_dict(), root / "mambaout.safetensors", weights_metadata("test_mambaout", names, pre))


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every user file under `root` (HOME here); caches under ~/.cache (the built-in set's Arrow copy, made when
    `datasets` is first imported in this process) are not the user's files."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != ".cache" and p.name != ".trainer.lock"  # the run's lock
    }


CASES = [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--task", "tags"], "--task must be one of auto, multiclass, multilabel, got 'tags'"),
    (["--task", "multilabel"], "--data digits: --task multilabel, but it has one label per image"),
    (["--loss", "asl"], "--loss asl is for multi-label data, and these labels are one per image"),
    (["--threshold", "0.3"], "--threshold applies to multi-label data"),
    (["--best-metric", "map"], "--best-metric map is for multi-label data"),
    (["--data", "tags_missing"], "tags_missing/labels.csv names 1 file(s) that do not exist (c.png)"),
    (["--data", "tags_empty"], "tags_empty/labels.csv has 1 row(s) with no labels (b.png)"),
    (["--data", "tags_twice"], "tags_twice/labels.csv lists 1 file(s) more than once (a.png); keep one row per"),
    (["--data", "tags_both"], "is listed in both train/labels.csv and val/labels.csv; an image belongs to one split"),
    (["--balanced-sampler", "--streaming"], "--balanced-sampler draws from map-style data and a stream cannot"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch-size", "-8"], "--batch-size must be a positive integer, got -8"),
    (["--imgsz", "0"], "--imgsz must be at least 8 pixels, got 0"),
    (["--epochs", "abc"], "--epochs expects int, got 'abc'"),
    (["--lr", "fast"], "--lr expects float, got 'fast'"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 (off) or more"),
    (["--loader", "fast"], "argument --loader: invalid choice: 'fast'"),
    (["--loader", "dali", "--auto-augment", "rand-m9-mstd0.5"], "has no DALI equivalent; use --loader torch"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["--batch-size", "auto", "--grad-accum", "3"], "--batch-size auto falls back to 128 without a GPU, which"),
    (["--batch-size", "0"], "--batch-size expects int or auto, got '0'"),
    (["--patience", "0"], "--patience must be 1 or more epochs, got 0; leave it out to train every epoch"),
    (["--patience", "2.5"], "--patience expects int, got '2.5'"),
    (["--freeze", "head"], "--freeze must be `backbone` or a positive number of stages, got 'head'"),
    (["--freeze", "backbone", "--unfreeze-epoch", "3"], "--unfreeze-epoch 3 needs --freeze and must be between 2"),
    (["--unfreeze-epoch", "2", "--epochs", "2"], "--unfreeze-epoch 2 needs --freeze"),
    (["--freeze", "9"], "--freeze 9: the model has 5 stage(s) before its classifier"),
    (["--dist-timeout", "-1"], "--dist-timeout must be minutes, or 0 for PyTorch's default, got -1.0"),
    (["--resume", "auto", "--model", "resnet18"], "--model resnet18 differs from the run's resnet10t"),
    (["--data", "no/such/folder"], "--data no/such/folder: no such file or folder"),
    (["--streaming"], "--data digits: --streaming reads a hub id or Parquet/WebDataset shards; convert this data once"),
    (["--train-samples", "100"], "--train-samples sets the epoch length of --streaming data"),
    (["--data", "shards/train-{0..3}.tar"], "--data shards/train-{0..3}.tar: the pattern matches no files"),
    (["--model", "resnet181"], "did you mean resnet18"),
    (["--model", "vit_tiny_patch16_224", "--imgsz", "8"], "is built for 224 px and cannot take --imgsz 8"),
    (["--progressive", "16"], "--progressive 16 must be at least 8 px and below --imgsz 16 (where the ramp ends)"),
    (["--progressive", "8", "--progressive-ramp", "1,2"], "--progressive-ramp 1,2 ends after the last epoch (1)"),
    (["--progressive", "8", "--progressive-ramp", "2,1"], "--progressive-ramp takes two epochs A,B with 1 <= A <= B"),
    (["--progressive-ramp", "1,1"], "--progressive-ramp sets the epochs of the --progressive ramp; add --progressive"),
    (["--model", "test_vit", "--progressive", "8"], "--model test_vit cannot take 8 px (--progressive 8) (Assertion"),
    (["--test-imgsz", "4"], "--test-imgsz must be at least 8 pixels, got 4"),
    (["--optimizer", "adamx"], "--optimizer 'adamx' is unknown"),
    (["--config", "missing.yaml"], "--config missing.yaml: file not found"),
    (["--config", "bad.yaml"], "--config bad.yaml: not valid YAML (line 3)"),
    (["--config", "typo.yaml"], "unknown key(s) in train: epoch"),
    (["--pretrained", "garbage.pth"], "--pretrained garbage.pth: not a readable weights file"),
    (["--pretrained", "payload.pth"], "--pretrained payload.pth: not a readable weights file (UnpicklingError"),
    (["--pretrained", "nothing.pth"], "--pretrained nothing.pth: no such file"),
    (["--resume", "runs/train/nope"], "--resume runs/train/nope: no such run folder"),
    (["--resume", "norun"], "--resume norun: not a trainer run folder (no config.yaml)"),
    (["--resume", "--project", "empty"], "--resume: no run with a checkpoint under empty"),
    (["--resume", "runs/train/exp", "--model", "resnet18"], "--model resnet18 differs from the run's resnet10t"),
    (["--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1], got 1.5"),
    (["--distill-temperature", "0"], "--distill-temperature must be positive, got 0.0"),
    (["--teacher-weights", "t.safetensors"], "--teacher-weights needs --teacher MODEL (the teacher's timm name)"),
    (
        ["--teacher", "resnet18"],
        "--teacher resnet18 needs its weights: --teacher-weights PATH, or --teacher-pretrained",
    ),
    (["--teacher", "resnet18", "--teacher-pretrained", "--teacher-weights", "t.pth"], "two sources of weights"),
    (["--teacher", "resnet181", "--teacher-pretrained"], "--teacher 'resnet181' is not a timm model; did you mean"),
    (
        ["--teacher", "resnet18", "--teacher-pretrained"],
        "timm's resnet18 weights predict 1000 classes, the data has 10",
    ),
    (["--teacher", "test_resnet", "--teacher-weights", "none.pth"], "--teacher-weights none.pth: no such file"),
    (
        ["--teacher", "test_resnet", "--teacher-weights", "payload.pth"],
        "payload.pth: not a readable weights file (Unpi",
    ),
    (["--teacher", "test_resnet", "--teacher-weights", "teacher5.safetensors"], "predicts 5 classes, the data has 10"),
    (
        ["--teacher", "test_resnet", "--teacher-weights", "teacher32.safetensors"],
        "trained at 32 px, this run is --imgsz 16",
    ),
    (["--teacher", "test_vit", "--teacher-weights", "teacher32.safetensors"], "holds a test_resnet, not a test_vit"),
    (
        ["--teacher", "test_efficientnet", "--teacher-weights", "resnet.pth"],
        "resnet.pth does not fit a test_efficientnet",
    ),
    (["--resume", "runs/train/exp", "--label-smoothing", "0.2"], "--label-smoothing 0.2 differs from the run's 0.1"),
    (["--distill-alpha", "0.9"], "--distill-alpha 0.9 shape(s) a teacher's term and no --teacher is given"),
    (["--data", "accents"], "spelt two ways in Unicode (composed and decomposed accents, 'cafe\\u0301' vs 'caf\\xe9')"),
    (["--imgsz", "100000"], "--imgsz 100000: a batch of 64 images of 3 x 100000 x 100000 needs at least"),
    (["--resume", "runs/train/exp"], "step-25 (random_states_0.pkl missing); start the run again without --resume"),
    (["--data-changed", "maybe"], "--data-changed must be ok (or empty), got 'maybe'"),
    (["--exclude", "missing.txt"], "--exclude missing.txt: no such file; give a list of files"),
    (["--exclude", "typo.yaml"], "the images of --data digits are stored without file names to match"),
    (["--exclude", "typo.yaml", "--streaming"], "--exclude leaves files out of map-style data and a stream"),
]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the CLI sets them; keep them out of other tests
        monkeypatch.setenv(name, "1")
    _existing_run(tmp_path)
    before = _snapshot(tmp_path)

    assert main(["train", *(FAST if "--resume" not in args else []), *args]) == 2

    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trainer: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten
    assert not (tmp_path / "pwned").exists()  # the pickled payload never ran


# Other commands' mistakes (trainer data audit, --cam): the same rules.
COMMAND_CASES = [
    (["data", "audit", *FAST, "--folds", "1"], "--folds 1: cross-validation needs at least 2 folds (5 is usual)"),
    (
        ["data", "audit", "--data", "tiny", "--imgsz", "16", "--batch-size", "2", "--folds", "5"],
        "--folds 5: every class needs at least 5 training images (one per fold) and a (3), b (3) have fewer",
    ),
    (["data", "audit", "--resume", "norun"], "--resume norun: not an audit folder (no config.yaml)"),
    (
        ["val", "--weights", "mambaout.safetensors", "--data", "digits", "--cam"],
        "--cam: test_mambaout has no stage with a spatial map that grad-cam can use",
    ),
    (
        ["predict", "--weights", "mambaout.safetensors", "tiny/train/a/0.png", "--cam"],
        "--cam: test_mambaout has no stage with a spatial map that grad-cam can use",
    ),
]


@pytest.mark.parametrize(("args", "expected"), COMMAND_CASES, ids=[" ".join(a) for a, _ in COMMAND_CASES])
def test_bad_input_of_other_commands(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    _existing_run(tmp_path)
    before = _snapshot(tmp_path)

    assert main(args) == 2

    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trainer: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path) == before
