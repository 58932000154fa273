"""Tuning: early stopping (--patience), fine-tuning (--freeze), TTA (val/predict --tta) and lr-find, at 1 and 2
gloo ranks."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from conftest import CPU_2PROC, accelerate_launch, check, config_of, results, run, trainer
from safetensors.torch import load_file, save_file
from test_resume import assert_same_weights, kill_when, start, steps

from trainer.run.layout import STATE_FILE, checkpoint_dirs

# An lr so small the weights never change what they predict: val top-1 is the same every epoch, so epoch 1 is the
# best and no later one improves on it (the best is a strict improvement). A ViT has no BatchNorm statistics
# that would move without the lr.
STUCK = ("--data", "digits", "--imgsz", "16", "--model", "test_vit", "--batch-size", "64", "--tracker", "none")
STUCK += ("--lr", "1e-12", "--min-lr", "0", "--warmup-lr", "0", "--warmup-epochs", "0", "--sched", "constant")


@pytest.mark.parametrize("ranks", [1, 2])
def test_patience_stops_after_the_right_epoch(workdir: Path, ranks: int):
    """--patience 2 on a run whose best is epoch 1: it ends normally after epoch 3 of 6, on every rank alike."""
    args = ("train", *STUCK, "--epochs", "6", "--patience", "2")
    if ranks == 1:  # and --batch-size auto on a CPU: the default batch, said in one line, recorded as a number
        args += ("--batch-size", "auto")
    cmd = accelerate_launch(CPU_2PROC, *args) if ranks == 2 else trainer(*args)
    proc = check(run(cmd, workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    assert config_of(run_dir)["launch"]["num_processes"] == ranks
    assert [int(r["epoch"]) for r in results(run_dir)] == [1, 2, 3]
    if ranks == 1:
        assert "--batch-size auto: no GPU to probe on cpu; using the default 128" in proc.stdout
        assert config_of(run_dir)["train"]["batch_size"] == 128 and "global batch 128 = 128 x 1 x 1" in proc.stdout
    assert "stopped early at epoch 3" in proc.stdout and "since epoch 1" in proc.stdout
    assert (run_dir / "weights" / "best.safetensors").is_file() and (run_dir / "weights" / "last.safetensors").is_file()
    assert (run_dir / "results.png").is_file()
    # The count is in every rank's checkpoint state, so a resume keeps counting; the run is finished for --resume auto.
    newest = checkpoint_dirs(run_dir)[-1]
    for rank in range(ranks):
        state = json.loads((newest / STATE_FILE.format(rank=rank)).read_text())
        assert state["epoch"] == 3 and state["epochs_since_best"] == 2 and state["stopped_epoch"] == 3
    if ranks == 1:
        again = check(run(trainer(*args, "--resume", "auto"), workdir))
        assert "nothing to do" in again.stderr, again.stderr


# Fine-tuning from a weights file: 1,617 training digits / 64 = 25 optimizer steps per epoch, repeatable bit for bit.
TUNE = ("--data", "digits", "--imgsz", "16", "--epochs", "2", "--batch-size", "64", "--deterministic", "--seed", "3")
TUNE += ("--model", "test_resnet", "--tracker", "none", "--workers", "0", "--pretrained", "init.safetensors")
TUNE += ("--freeze", "backbone", "--unfreeze-epoch", "2")


def _weights_file(workdir: Path) -> dict[str, torch.Tensor]:
    """A weights file as a user brings one: a seeded test_resnet for the 10 one-channel digit classes."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(workdir / "init.safetensors"))
    return state


def _changed(before: dict[str, torch.Tensor], file: Path) -> set[str]:
    after = load_file(str(file))
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_freeze_backbone_then_unfreeze_two_ranks(workdir: Path):
    """2 gloo ranks (DDP with unused parameters): epoch 1 changes only the classifier's tensors (BatchNorm
    statistics included: they stay fixed); after --unfreeze-epoch 2 every tensor has changed."""
    init = _weights_file(workdir)
    proc = check(run(accelerate_launch(CPU_2PROC, "train", *TUNE, "--keep-checkpoints", "2"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    assert config_of(run_dir)["launch"]["num_processes"] == 2
    params = [name for name, _ in timm.create_model("test_resnet", num_classes=10, in_chans=1).named_parameters()]
    backbone = sum(not name.startswith("fc.") for name in params)
    assert f"--freeze backbone: {backbone} parameter tensors frozen until epoch 2" in proc.stdout
    assert _changed(init, run_dir / "checkpoints" / "step-25" / "model.safetensors") == {"fc.weight", "fc.bias"}
    assert _changed(init, run_dir / "weights" / "last.safetensors") == set(init)


def test_freeze_kill_and_resume_across_the_unfreeze_point_is_bitwise_exact(workdir: Path):
    """SIGKILL while frozen (after step 10) and again after the unfreeze (after step 35), resumed each time: the
    weights equal those of the uninterrupted run bit for bit."""
    _weights_file(workdir)
    runs = workdir / "runs" / "train"
    check(run(trainer("train", *TUNE, "--name", "ref"), workdir))
    cut = runs / "cut"
    kill_when(
        start(trainer("train", *TUNE, "--name", "cut", "--checkpoint-every", "5"), workdir), lambda: 10 in steps(cut)
    )
    assert steps(cut)[-1] < 25
    out = kill_when(start(trainer("train", "--resume", str(cut)), workdir), lambda: steps(cut)[-1] >= 35)
    assert f"resuming {cut}" in out
    check(run(trainer("train", "--resume", str(cut)), workdir))
    assert_same_weights(runs / "ref", cut)


def _eval_batches(weights: Path):
    """The validation images as `trainer val` feeds them (the weights' eval transform), with an Accelerator."""
    from accelerate import Accelerator

    from trainer import data
    from trainer.config import DataConfig
    from trainer.use.inference import load_model, read_weights

    trained = read_weights(weights)
    cfg = DataConfig(data="digits", imgsz=trained.pre.imgsz, workers=0)
    accelerator = Accelerator(cpu=True)
    dataset = data.load_data(accelerator, cfg)
    spec = data.loader_spec(cfg, data.Backend("torch", "test"), trained.pre)
    return load_model(trained), list(data.eval_loader(accelerator, dataset.splits["val"], spec, 64))


def test_val_and_predict_tta_equal_the_mean_of_the_forward_passes(workdir: Path):
    """`val --tta flip`: top-1 and loss of the mean of the logits of each image and its mirror, computed here by
    hand; `--tta crops` runs; `predict --tta flip` gives the hand-computed probabilities of a few files."""
    check(run(trainer("train", *STUCK[:8], "--epochs", "1", "--lr", "1e-2"), workdir))
    weights = workdir / "runs" / "train" / "exp" / "weights" / "best.safetensors"
    for mode in ("flip", "crops"):
        out = check(run(trainer("val", "--weights", str(weights), "--tta", mode, "--name", mode), workdir)).stdout
        assert f"TTA {mode}" in out
    flip, crops = (json.loads((workdir / "runs" / "val" / m / "metrics.json").read_text()) for m in ("flip", "crops"))
    assert flip["tta"] == "flip" and crops["tta"] == "crops" and flip["images"] == crops["images"] == 180

    model, batches = _eval_batches(weights)
    with torch.no_grad():
        logits = torch.cat([(model(b.images) + model(b.images.flip(-1))) / 2 for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert round(flip["val/top1"] * 180) == (logits.argmax(1) == labels).sum().item()
    assert flip["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)

    from PIL import Image

    from trainer import data
    from trainer.use.inference import read_weights

    for i, batch in enumerate(batches[0].images[:3]):
        pixels = (batch * 0.5 + 0.5).clamp(0, 1)  # any image will do: a PNG of a validation tensor
        Image.fromarray((pixels[0].numpy() * 255).round().astype("uint8")).save(workdir / f"img{i}.png")
    files = [str(workdir / f"img{i}.png") for i in range(3)]
    check(run(trainer("predict", "--weights", str(weights), *files, "--json", "--tta", "flip", "--topk", "1"), workdir))
    report = json.loads((workdir / "runs" / "predict" / "exp" / "predictions.json").read_text())
    spec = data.LoaderSpec(data.Backend("torch", "test"), read_weights(weights).pre, 0)
    images = torch.cat([b.images for b in data.files_loader(files, spec, 8, "cpu")[0]])
    with torch.no_grad():
        probs = ((model(images) + model(images.flip(-1))) / 2).softmax(1).max(1).values
    assert [r["predictions"][0]["probability"] for r in report["images"]] == pytest.approx(probs.tolist(), abs=1e-5)


def test_lr_find_two_ranks_writes_the_sweep_and_an_advisory_suggestion(workdir: Path):
    """`trainer lr-find` under accelerate launch (2 gloo ranks): lr_find.csv with rising lrs within the range,
    lr_find.png, and a suggested lr that is one of the swept ones."""
    flags = ("--data", "digits", "--imgsz", "16", "--model", "test_resnet", "--batch-size", "64", "--tracker", "none")
    sweep = ("--steps", "30", "--start-lr", "1e-5", "--end-lr", "1")
    out = check(run(accelerate_launch(CPU_2PROC, "lr-find", *flags, *sweep), workdir)).stdout
    folder = workdir / "runs" / "lr_find" / "exp"
    with open(folder / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows]
    assert 5 <= len(rows) <= 30 and lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-5)
    assert all(1e-5 <= lr <= 1 for lr in lrs) and all(math.isfinite(float(r["smoothed_loss"])) for r in rows[:5])
    assert (folder / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    line = next(x for x in out.splitlines() if x.startswith("lr-find:"))
    assert "on 2 process(es)" in line and "advisory" in line
    suggested = float(line.split("suggested lr ")[1].split()[0])
    assert any(suggested == pytest.approx(lr, rel=1e-2) for lr in lrs)
