"""Real runs of `trainer train` on the embedded data: 1 process, and 2 gloo ranks on CPU."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import CPU_2PROC, accelerate_launch, check, config_of, results, run, torchrun, torchrun_script, trainer
from PIL import Image
from safetensors import safe_open
from wandb_file import read_run

from trainer.report.reporter import RESULTS_COLUMNS

FAST = ("--data", "digits", "--imgsz", "16", "--epochs", "1", "--batch-size", "64")


def test_default_run_reaches_accuracy(workdir: Path):
    """`trainer train` with no arguments: the embedded MNIST digits, >= 95 % top-1, wandb offline, one run."""
    proc = check(run(trainer("train"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    assert f"Results saved to {Path('runs/train/exp')}" in proc.stdout
    rows = results(run_dir)
    assert list(rows[0]) == list(RESULTS_COLUMNS)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    best = max(float(r["val/top1"]) for r in rows)
    assert best >= 0.95, rows
    assert all(0.0 <= float(r["val/top5"]) <= 1.0 and float(r["val/top5"]) >= float(r["val/top1"]) for r in rows)

    with safe_open(str(run_dir / "weights" / "best.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["model_name"] == "resnet10t"
        assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
        assert meta["imgsz"] == "32" and len(json.loads(meta["mean"])) == 1
        assert float(meta["val_top1"]) == pytest.approx(best, abs=1e-6)
    assert (run_dir / "weights" / "last.safetensors").is_file()

    launch = config_of(run_dir)["launch"]
    assert launch["num_processes"] == 1 and launch["device"] == "cpu"
    assert launch["sync_bn"] is False
    # No credentials in the test's HOME: wandb goes offline by itself and says how to upload.
    assert "wandb sync" in proc.stdout
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def test_two_ranks_accelerate_launch_wandb_and_sync_bn(workdir: Path):
    """2 real gloo ranks through accelerate launch: SyncBN skipped on CPU with the reason given once, and exactly
    one wandb run (read back from its offline file) with what a dashboard shows, plus the run folder's reports."""
    wandb_flags = ("--log-every", "5", "--wandb-project", "digits-e2e", "--tags", "e2e,cpu", "--notes", "two ranks")
    proc = check(run(accelerate_launch(CPU_2PROC, "train", *FAST, "--sync-bn", *wandb_flags), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    cfg = config_of(run_dir)
    assert cfg["launch"]["num_processes"] == 2
    assert cfg["launch"]["backend"] == "gloo"
    assert cfg["launch"]["per_device_batch_size"] == 32
    assert cfg["model"]["sync_bn"] is True and cfg["launch"]["sync_bn"] is False
    assert "CUDA" in cfg["launch"]["sync_bn_reason"]
    assert proc.stdout.count("--sync-bn skipped") == 1
    assert len(results(run_dir)) == 1
    assert not (workdir / "runs" / "train" / "exp2").exists()  # both ranks wrote into one run folder

    # The wandb run: one offline run with one run record, whose id is stored for --resume.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    wandb_run = read_run(next(offline[0].glob("run-*.wandb")))
    assert len(wandb_run.runs) == 1
    meta = wandb_run.runs[0]
    assert meta.run_id == (run_dir / "wandb_id.txt").read_text().strip()
    assert meta.project == "digits-e2e" and meta.display_name == "exp"
    assert list(meta.tags) == ["e2e", "cpu"] and meta.notes == "two ranks"
    assert wandb_run.config["launch.num_processes"] == 2 and wandb_run.config["launch.distributed_type"]
    assert wandb_run.config["dataset.val_size"] == 180 and wandb_run.config["train.epochs"] == 1
    assert {"train/loss", "train/lr", "train/imgs_per_sec", "val/loss", "val/top1", "val/top5", "epoch"} <= (
        wandb_run.history_keys
    )
    # 25 optimizer steps logged every 5: five train rows, each with throughput and a fractional epoch.
    train_rows = [row for row in wandb_run.history if "train/loss" in row]
    assert [row["_step"] for row in train_rows] == [5, 10, 15, 20, 25]
    assert all(row["train/imgs_per_sec"] > 0 and 0 < row["epoch"] <= 1 for row in train_rows)
    best_top1 = float(results(run_dir)[0]["val/top1"])
    assert wandb_run.summary["best/val_top1"] == pytest.approx(best_top1, abs=1e-6)
    assert wandb_run.summary["best/epoch"] == 1
    for media in (
        "images/plots/results_",
        "images/plots/confusion_matrix_",
        "images/plots/val_predictions_",
        "table/val/predictions_",
        "table/val/confusion_matrix_table_",
        "images/plots/top_losses_",
        "table/val/top_losses_",
        "table/val/most_confused_",
    ):
        assert any(p.startswith(f"media/{media}") for p in wandb_run.files), (media, wandb_run.files)
    for path in wandb_run.files:
        assert (offline[0] / "files" / path).is_file()
    models = [a for a in wandb_run.artifacts if a.type == "model"]
    assert len(models) == 1 and "best" in models[0].aliases

    # Run folder reports, written once by the main process.
    for name in ("results.png", "confusion_matrix.png", "val_predictions.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300
    per_class = list(csv.DictReader((run_dir / "per_class.csv").read_text().splitlines()))
    assert sum(int(r["images"]) for r in per_class if r["class"] != "all") == 180 == int(per_class[-1]["images"])
    assert proc.stdout.count("per-class accuracy at the best epoch") == 1
    assert "\r" not in proc.stdout  # not a terminal: plain lines, no redrawn bar
    assert "Results saved to" in proc.stdout and "val_predictions.png" in proc.stdout


def test_two_ranks_torchrun_grad_accum_tensorboard(workdir: Path):
    """The same command under torchrun, with accumulation and TensorBoard: one group of 2, not two world-1 runs."""
    check(run(torchrun(2, "train", *FAST, "--grad-accum", "2", "--tracker", "tensorboard"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    launch = config_of(run_dir)["launch"]
    assert launch["num_processes"] == 2
    assert launch["per_device_batch_size"] == 16
    # 1,617 training digits / (16 per rank x 2 ranks) = 50 micro-batches per rank -> 25 optimizer steps.
    assert launch["steps_per_epoch"] == 25
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in events:
        tags |= set(EventAccumulator(str(path)).Reload().Tags()["scalars"])
    # The same keys as on wandb.
    assert {"train/loss", "train/lr", "train/imgs_per_sec", "val/loss", "val/top1", "val/top5", "epoch"} <= tags
    assert not (workdir / "runs" / "train" / "exp2").exists()


def test_two_rank_evaluation_equals_one_rank(workdir: Path):
    """Fixed weights evaluated by 2 ranks give exactly the 1-rank metrics (no sample lost or counted twice)."""
    check(run(trainer("train", *FAST, "--data", "mnist", "--tracker", "none"), workdir))
    weights = workdir / "runs" / "train" / "exp" / "weights" / "last.safetensors"
    script = str(Path(__file__).with_name("evaluate_weights.py"))
    check(run([sys.executable, script, str(weights), "one.json"], workdir))
    check(
        run(
            torchrun_script(2, script, str(weights), "two.json"),
            workdir,
        )
    )
    one = json.loads((workdir / "one.json").read_text())
    two = json.loads((workdir / "two.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["val/top1"] == one["val/top1"] and two["val/top5"] == one["val/top5"]
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-6)
    # Every rank's Predictions cover the whole set once, in dataset order, as with one rank.
    assert len(two["labels"]) == 500
    assert two["labels"] == one["labels"] and two["predicted"] == one["predicted"]


def test_config_written_by_accelerate_config_default(workdir: Path):
    """A launch config made by `accelerate config default` (what the wizard writes on a CPU machine) just works."""
    config = workdir / "default_config.yaml"
    check(
        run(
            [
                sys.executable,
                "-m",
                "accelerate.commands.accelerate_cli",
                "config",
                "default",
                "--config_file",
                str(config),
            ],
            workdir,
        )
    )
    check(run(accelerate_launch(config, "train", *FAST, "--tracker", "none"), workdir))
    assert config_of(workdir / "runs" / "train" / "exp")["launch"]["num_processes"] == 1


def test_silent_single_process_launch_is_refused(workdir: Path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process; we stop and name the config that works."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "-m",
        "trainer",
        "train",
        *FAST,
    ]
    proc = run(cmd, workdir)
    assert proc.returncode != 0
    assert "started only one" in proc.stderr and "accelerate_configs/cpu_2proc.yaml" in proc.stderr
    assert not (workdir / "runs").exists()


def test_tracker_none_imports_no_tracker(workdir: Path):
    code = (
        "import sys; from trainer.cli import main; "
        f"rc = main(['train', *{list(FAST)!r}, '--tracker', 'none']); "
        "mods = ('wandb', 'tensorboard', 'torch.utils.tensorboard', 'onnx', 'onnxscript', 'onnxruntime'); "
        "print('IMPORTED', [m for m in mods if sys.modules.get(m) is not None]); "
        "sys.exit(rc)"
    )
    proc = check(run([sys.executable, "-c", code], workdir))
    assert "IMPORTED []" in proc.stdout
    assert not list(workdir.rglob("wandb"))


def test_bad_input_is_one_line_exit_2(workdir: Path):
    proc = run(trainer("train", "--model", "resnet181"), workdir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "resnet18" in lines[0] and "Traceback" not in proc.stderr
    assert not (workdir / "runs").exists()


def test_run_folders_increment_files_follow_the_umask_header_states_augmentation(workdir: Path):
    """Three tiny runs: exp, exp2, then exp again with --exist-ok. The first runs under umask 002 (a shared group
    on a cluster): every file of the run is group-writable, weights and checkpoints included (safetensors writes
    0600 temporary files). Before the first epoch the header states the augmentation in force."""
    umask_002 = ["sh", "-c", 'umask 002 && exec "$@"', "sh"]
    first = trainer("train", *FAST, "--tracker", "none", "--checkpoint-every", "5", "--hflip", "0.25")
    proc = check(run([*umask_002, *first], workdir))
    lines = proc.stdout.splitlines()
    augment = next(i for i, line in enumerate(lines) if line.startswith("augment: "))
    assert augment < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1"))
    assert lines[augment] == (
        "augment: hflip 0.25, crop area 0.8-1 (default up to 64 px); off: auto-augment, mixup, cutmix, random erasing"
    )
    run_dir = workdir / "runs" / "train" / "exp"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.relative_to(run_dir).as_posix() for p in files}
    assert {"weights/best.safetensors", "weights/last.safetensors", "config.yaml", "results.csv"} <= names
    assert {"results.png", "confusion_matrix.png", "per_class.csv"} <= names
    assert any(n.startswith("checkpoints/step-") and n.endswith("model.safetensors") for n in names), names
    modes = {p.relative_to(run_dir).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == dict.fromkeys(names, oct(0o664))
    folders = [run_dir, *(p for p in run_dir.rglob("*") if p.is_dir())]
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(0o775)}

    check(run(trainer("train", *FAST, "--tracker", "none"), workdir))
    check(run(trainer("train", *FAST, "--tracker", "none", "--exist-ok"), workdir))
    assert sorted(p.name for p in (workdir / "runs" / "train").iterdir()) == ["exp", "exp2"]
