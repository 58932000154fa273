"""Issue 19, part A, through the real CLI: a diverging run with --skip-nonfinite saves only finite files; --resume
refuses data that changed (and continues on it on purpose); an incomplete newest checkpoint is skipped for the
newest complete one, and the resumed run still ends bit for bit where the uninterrupted one did."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import check, config_of, run, trainer
from PIL import Image
from safetensors.torch import load_file

TINY = ("--model", "test_resnet", "--imgsz", "16", "--tracker", "none", "--workers", "0", "--seed", "3")


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock file's (it names the latest process that held it)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".trainer.lock")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def _nonfinite(path: Path) -> list[str]:
    return [k for k, v in load_file(str(path)).items() if v.is_floating_point() and not torch.isfinite(v).all()]


def test_skip_nonfinite_saves_only_finite_weights_and_checkpoints(workdir: Path):
    proc = check(
        run(trainer("train", "--data", "digits", *TINY, "--epochs", "2", "--lr", "1e4", "--skip-nonfinite"), workdir)
    )
    assert "non-finite loss, update skipped" in proc.stdout + proc.stderr
    run_dir = workdir / "runs" / "train" / "exp"
    saved = sorted((run_dir / "weights").glob("*.safetensors")) + sorted(
        run_dir.glob("checkpoints/*/model.safetensors")
    )
    assert len(saved) == 4  # best, last, two checkpoints: before the fix, 12 BatchNorm statistics were NaN in each
    assert {p.name: _nonfinite(p) for p in saved} == {p.name: [] for p in saved}


def _folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 4)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    root / split / name / f"{name}{i}.png"
                )
    return root


def test_resume_refuses_changed_data_then_continues_on_purpose(workdir: Path):
    data = _folder(workdir / "pets")
    args = ("--data", str(data), *TINY, "--epochs", "2", "--batch-size", "8")
    check(run(trainer("train", *args), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    shutil.rmtree(run_dir / "checkpoints" / "step-6")  # as if stopped after epoch 1
    before = _files(run_dir)
    shutil.copytree(data / "train" / "dog", data / "train" / "emu")  # a class added: the model's head cannot load it
    proc = run(trainer("train", "--resume", str(run_dir)), workdir)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "trainer: error: --resume: the data changed since step-3 (train images 24 -> 36; classes added: emu); the "
        "model was built for 2 classes, so it cannot continue: start a new run without --resume"
    )
    assert _files(run_dir) == before  # nothing lost: checkpoint, weights, results.csv, config.yaml as they were
    shutil.rmtree(data / "train" / "emu")
    Image.new("RGB", (16, 16)).save(data / "train" / "cat" / "late.png")  # refused likewise (tests/unit), unless:
    proc = check(run(trainer("train", "--resume", str(run_dir), "--data-changed", "ok"), workdir))
    assert "--data-changed ok: resuming step-3 on changed data (train images 24 -> 25;" in proc.stdout
    record = config_of(run_dir)
    assert record["data_changes"][0]["resumed_at_step"] == 3 and record["checkpoint"]["data_changed"] == ""
    assert (run_dir / "checkpoints" / "step-6").is_dir()


def test_incomplete_newest_checkpoint_is_skipped_and_the_resume_stays_exact(workdir: Path):
    args = ("--data", "digits", *TINY, "--epochs", "2", "--batch-size", "64", "--deterministic")
    args += ("--checkpoint-every", "5", "--keep-checkpoints", "3")
    check(run(trainer("train", *args), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    uninterrupted = load_file(str(run_dir / "weights" / "last.safetensors"))
    results = (run_dir / "results.csv").read_text()
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-40", "step-45", "step-50"]
    shutil.rmtree(run_dir / "checkpoints" / "step-50")  # as if killed in epoch 2, after step 45
    (run_dir / "checkpoints" / "step-45" / "random_states_0.pkl").unlink()
    proc = check(run(trainer("train", "--resume", str(run_dir)), workdir))
    line = "--resume: skipped checkpoint step-45 (random_states_0.pkl missing); resuming from step-40"
    assert proc.stdout.count(line) == 1, proc.stdout
    resumed = load_file(str(run_dir / "weights" / "last.safetensors"))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert (run_dir / "results.csv").read_text() == results
