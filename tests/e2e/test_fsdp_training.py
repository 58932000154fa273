"""FSDP2 through the real CLI: 2 gloo ranks on CPU, a small timm ViT at 32 px.

Accelerate sets up FSDP only for GPU launches, so these runs go through tests/e2e/fsdp_on_cpu.py, which makes
Accelerate's state take its GPU branch (distributed_type FSDP) and then runs the unchanged CLI under the shipped
accelerate_configs/fsdp.yaml. The launch without that harness is what a user on a CPU machine gets: refused.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import timm
import torch
from conftest import ROOT, check, config_of, results, run
from safetensors.torch import load_file

from trainer.run.safeload import _DistcpMetadataUnpickler

FSDP_YAML = ROOT / "accelerate_configs" / "fsdp.yaml"
ARGS = ("train", "--data", "digits", "--model", "test_vit", "--imgsz", "32", "--epochs", "2", "--batch-size", "128")
ARGS += ("--tracker", "none", "--workers", "0", "--clip-grad", "1.0", "--grad-checkpointing", "--ema")


def fsdp_launch(*args: str, harness: bool = True) -> list[str]:
    # bf16 is emulated (and slow) on this CPU: fp32 here, the yaml's bf16 on GPUs.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML)]
    launch += ["--num_processes", "2", "--mixed_precision", "no"]
    target = [str(ROOT / "tests" / "e2e" / "fsdp_on_cpu.py")] if harness else ["-m", "trainer"]
    return [*launch, *target, *args]


def shard_rows(folder: Path, key: str) -> list[int]:
    """Rows of `key` that each rank wrote into a torch.distributed.checkpoint folder (one chunk per rank)."""
    with open(folder / ".metadata", "rb") as f:
        metadata = _DistcpMetadataUnpickler(f).load()
    entry = metadata.state_dict_metadata[key]
    assert entry.size[0] == sum(chunk.sizes[0] for chunk in entry.chunks)
    return [chunk.sizes[0] for chunk in entry.chunks]


def test_fsdp_trains_with_ema_shards_saves_full_weights_and_resumes_bitwise(workdir):
    proc = check(run(fsdp_launch(*ARGS, "--checkpoint-every", "8", "--keep-checkpoints", "9"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    launch = config_of(run_dir)["launch"]
    assert (launch["num_processes"], launch["distributed_type"], launch["fsdp_blocks"]) == (2, "FSDP", ["Block"])
    rows = results(run_dir)
    assert float(rows[1]["train/loss"]) < float(rows[0]["train/loss"])
    assert float(rows[1]["val/top1"]) > 0.2, proc.stdout  # 10 classes: chance is 0.1

    # Sharded: in the checkpoint each of the 2 ranks wrote half of every block's weight, not the whole tensor.
    steps = sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps == [8, 12, 16, 24]  # 12 steps per epoch
    sharded = run_dir / "checkpoints" / "step-24" / "pytorch_model_fsdp_0"
    assert shard_rows(sharded, "model.blocks.0.attn.qkv.weight") == [96, 96]  # 3 x 64 rows, split over 2 ranks
    # The EMA is sharded the same way, and saved by every rank beside the model.
    assert shard_rows(sharded.with_name("ema_fsdp"), "blocks.0.attn.qkv.weight") == [96, 96]
    assert all(0 < float(r["val/top1_ema"]) <= 1 for r in rows)

    # The weights file is gathered: a full, plain timm state dict that loads strictly into timm's own model.
    weights = load_file(run_dir / "weights" / "last.safetensors")
    model = timm.create_model("test_vit", num_classes=10, in_chans=1, img_size=32)
    model.load_state_dict(weights)  # strict: every key, every full shape
    assert weights["blocks.0.attn.qkv.weight"].shape == (192, 64)

    # Resume from the sharded mid-epoch checkpoint at step 8 (a copy of the run without what came later): the
    # resumed run must end with exactly the same weights and the same validation results.
    copy = workdir / "runs" / "train" / "resumed"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("step-1?", "step-2?", "*.csv"))
    for file in (copy / "weights").iterdir():
        file.unlink()
    check(run(fsdp_launch("train", "--resume", str(copy)), workdir))
    resumed = load_file(copy / "weights" / "last.safetensors")
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights), "resumed weights differ"
    # The EMA came back exactly too: its evaluations match the uninterrupted run's.
    for key in ("val/top1", "val/loss", "val/top1_ema", "val/loss_ema"):
        assert [r[key] for r in results(copy)] == [r[key] for r in rows], key
    best, best_resumed = (load_file(d / "weights" / "best.safetensors") for d in (run_dir, copy))
    assert all(torch.equal(best_resumed[k], best[k]) for k in best), "resumed best weights differ"


def test_fsdp_launch_on_cpu_is_refused_in_one_line(workdir):
    """Without the harness, as a user on a CPU machine runs it: Accelerate quietly sets up DDP; trainer refuses."""
    proc = run(fsdp_launch(*ARGS, "--epochs", "1", harness=False), workdir)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trainer: error: ")]
    assert errors and errors[0].startswith(
        "trainer: error: the launch asked for FSDP but Accelerate set up MULTI_CPU on cpu"
    ), proc.stderr[-2000:]
    assert "trainer/" not in proc.stderr  # no traceback through trainer (the launcher reports its child's exit 2)
    assert not (workdir / "runs").exists()
