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
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch-size", "-8"], "--batch-size must be a positive integer, got -8"),
    (["--imgsz", "0"], "--imgsz must be at least 8 pixels, got 0"),
    (["--epochs", "abc"], "--epochs expects int, got 'abc'"),
    (["--lr", "fast"], "--lr expects float, got 'fast'"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 (off) or more"),
    (["--loader", "fast"], "argument --loader: invalid choice: 'fast'"),
    (["--loader", "dali", "--auto-augment", "rand-m9-mstd0.5"], "has no DALI equivalent; use --loader torch"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["--dist-timeout", "-1"], "--dist-timeout must be minutes, or 0 for PyTorch's default, got -1.0"),
    (["--resume", "auto", "--model", "resnet18"], "--model resnet18 differs from the run's resnet10t"),
    (["--data", "no/such/folder"], "--data no/such/folder: no such file or folder"),
    (["--streaming"], "--data digits: --streaming reads a hub id or Parquet/WebDataset shards; convert this data once"),
    (["--train-samples", "100"], "--train-samples sets the epoch length of --streaming data"),
    (["--data", "shards/train-{0..3}.tar"], "--data shards/train-{0..3}.tar: the pattern matches no files"),
    (["--model", "resnet181"], "did you mean resnet18"),
    (["--model", "vit_tiny_patch16_224", "--imgsz", "8"], "is built for 224 px and cannot take --imgsz 8"),
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
    (["--resume", "runs/train/exp"], "step-25 is damaged (JSONDecodeError); start the run again without --resume"),
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
