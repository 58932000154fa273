"""--progressive and --test-imgsz as users run them: killed mid-ramp (SIGKILL, then SIGTERM) and resumed to the
uninterrupted run's weights bit for bit (torch loader, with DataLoader workers after the resume, and DALI's CPU
operators); `trainer val` evaluating at the recorded test size; two gloo ranks following the same sizes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import check, config_of, results, run, torchrun_script, trainer
from test_resume import assert_same_weights, kill_when, start, steps

# digits at 16 -> 24 -> 32 px over 3 epochs (a ramp from epoch 1 to 3): 25 optimizer steps per epoch, a checkpoint
# every 5; timm's test_resnet keeps each run to seconds.
ARGS = ("--data", "digits", "--imgsz", "32", "--progressive", "16", "--progressive-ramp", "1,3", "--epochs", "3")
ARGS += ("--batch-size", "64", "--deterministic", "--seed", "3", "--model", "test_resnet", "--tracker", "none")
ARGS += ("--checkpoint-every", "5", "--workers", "0")


def test_killed_mid_ramp_resumes_bitwise_and_val_uses_the_test_size(workdir: Path):
    runs = workdir / "runs" / "train"
    args = (*ARGS, "--test-imgsz", "40")
    out = check(run(trainer("train", *args, "--name", "ref"), workdir)).stdout
    assert "progressive resizing: 16 px (epoch 1), 24 px (epoch 2), 32 px (epoch 3)" in out
    assert "epoch 2/3  24 px  " in out
    assert [r["imgsz"] for r in results(runs / "ref")] == ["16", "24", "32"]
    assert config_of(runs / "ref")["dataset"]["imgsz_per_epoch"] == [16, 24, 32]
    cut = runs / "cut"
    # SIGKILL in epoch 2 (24 px); the resume runs persistent DataLoader workers, which read the size from shared
    # memory, and is stopped by SIGTERM in epoch 3 (32 px); the last resume ends the run.
    kill_when(start(trainer("train", *args, "--name", "cut"), workdir), lambda: 30 in steps(cut))
    proc = start(trainer("train", "--resume", str(cut), "--workers", "2"), workdir)
    out = kill_when(proc, lambda: steps(cut)[-1] > 55, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out[-3000:]
    check(run(trainer("train", "--resume", str(cut)), workdir))
    assert_same_weights(runs / "ref", cut)
    assert (cut / "results.csv").read_text() == (runs / "ref" / "results.csv").read_text()

    # The weights record the test size: `trainer val` evaluates at 40 px, as the run's own last validation did.
    check(run(trainer("val", "--weights", str(cut / "weights" / "last.safetensors")), workdir))
    metrics = json.loads((workdir / "runs" / "val" / "exp" / "metrics.json").read_text())
    assert metrics["imgsz"] == 40
    assert f"{metrics['val/top1']:.6g}" == results(cut)[-1]["val/top1"]  # results.csv keeps 6 digits


def test_dali_killed_mid_ramp_resumes_bitwise(workdir: Path):
    pytest.importorskip("nvidia.dali")
    runs = workdir / "runs" / "train"
    args = (*ARGS, "--loader", "dali")
    check(run(trainer("train", *args, "--name", "ref"), workdir))
    assert config_of(runs / "ref")["launch"]["loader"] == "dali"
    cut = runs / "cut"
    kill_when(start(trainer("train", *args, "--name", "cut"), workdir), lambda: 35 in steps(cut))
    check(run(trainer("train", "--resume", str(cut)), workdir))
    assert_same_weights(runs / "ref", cut)
    assert [r["imgsz"] for r in results(cut)] == ["16", "24", "32"]


def test_two_ranks_follow_the_same_sizes(workdir: Path):
    script = str(Path(__file__).with_name("progressive_ranks.py"))
    out = check(run(torchrun_script(2, script), workdir)).stdout
    ranks = [json.loads(line.removeprefix("SIZES ")) for line in out.splitlines() if line.startswith("SIZES ")]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world"] for r in ranks} == {2}
    assert ranks[0]["sizes"] == ranks[1]["sizes"] == [[16], [24], [32]]
