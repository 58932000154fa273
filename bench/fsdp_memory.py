"""Peak GPU memory and img/s of one large timm ViT under DDP, FSDP2, and FSDP2 + grad checkpointing, on one GPU.

Each case runs in its own process with trainer's own set-up (build_accelerator, build_model, mark_fsdp_blocks,
build_optimizer, accelerator.prepare) and the loop's step (forward, bf16 autocast, backward, clip, AdamW step) on
synthetic batches: no data loading, no trackers. FSDP on one GPU shards nothing (world size 1); what shows is the
activation memory that grad checkpointing saves and FSDP's own overheads. A case that fails is recorded with its
error and the others still run.

    python bench/fsdp_memory.py --out fsdp_memory.json              # on a GPU machine (~2 minutes)
    python bench/fsdp_memory.py --cpu-smoke --out /tmp/smoke.json   # dry run on CPU: test_vit, 2 gloo ranks

Cases:
  ddp       plain `accelerator.prepare` in one process (what a one-GPU DDP rank holds: full params, grads, AdamW)
  fsdp2     `accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1`
  fsdp2_gc  the same with --grad-checkpointing (timm's set_grad_checkpointing)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("ddp", "fsdp2", "fsdp2_gc")


def launch_case(case: str, args: argparse.Namespace) -> dict:
    """Run one case in a fresh process (its own CUDA context and peak), return its result or its error."""
    child = [str(Path(__file__).resolve()), "--case", case, "--model", args.model, "--imgsz", str(args.imgsz)]
    child += ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    child += ["--cpu-smoke"] if args.cpu_smoke else []
    if case == "ddp":
        cmd = [sys.executable, *child]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_configs" / "fsdp.yaml"),
        ]
        # On a CPU, FSDP needs a process group: 2 gloo ranks (and fp32; bf16 is emulated there).
        cmd += [
            "--num_processes",
            "2" if args.cpu_smoke else "1",
            "--mixed_precision",
            "no" if args.cpu_smoke else "bf16",
        ]
        cmd += ["--main_process_port", str(29500 + CASES.index(case)), *child]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {args.case_timeout} s"}
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        tail = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-6:]
        return {"case": case, "error": f"exit {proc.returncode}: " + " | ".join(tail)[-1500:]}
    return {**json.loads(found[0].removeprefix("RESULT ")), "wall_s": round(time.time() - start, 1)}


def run_case(case: str, args: argparse.Namespace) -> None:
    """Inside the launched process: set up as trainer does, time `steps` optimizer steps after `warmup`."""
    import torch
    import torch.nn.functional as F
    from accelerate.utils import DistributedType

    if args.cpu_smoke and case != "ddp":
        sys.path.insert(0, str(ROOT / "tests" / "e2e"))
        from fsdp_on_cpu import force_fsdp_on_cpu  # Accelerate takes FSDP only on GPUs; the tests' harness

        force_fsdp_on_cpu()
    from trainer.config import build_config
    from trainer.train import optim
    from trainer.train.launch import build_accelerator
    from trainer.train.model import build_model, mark_fsdp_blocks

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    precision = "bf16" if cuda else "no"
    cfg = build_config(
        {
            "model": {"model": args.model, "grad_checkpointing": case == "fsdp2_gc"},
            "train": {"mixed_precision": precision, "batch_size": args.batch_size},
            "run": {"tracker": "none"},
        }
    )
    accelerator = build_accelerator(cfg)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if case != "ddp" and not fsdp:
        raise SystemExit(f"case {case}: Accelerate set up {accelerator.distributed_type}, not FSDP")
    model = build_model(cfg.model, num_classes=1000, in_chans=3, imgsz=args.imgsz)
    blocks = mark_fsdp_blocks(model) if fsdp else []
    params = sum(p.numel() for p in model.parameters())
    optimizer = optim.build_optimizer(cfg.optim, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    local = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
    per_rank = args.batch_size // accelerator.num_processes
    generator = torch.Generator(device=accelerator.device).manual_seed(accelerator.process_index)
    images = torch.randn(per_rank, 3, args.imgsz, args.imgsz, device=accelerator.device, generator=generator)
    labels = torch.randint(0, 1000, (per_rank,), device=accelerator.device, generator=generator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with accelerator.autocast():
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gib = 2**30
    result = {
        "case": case,
        "model": args.model,
        "imgsz": args.imgsz,
        "global_batch_size": args.batch_size,
        "processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).removeprefix("DistributedType."),
        "precision": accelerator.mixed_precision,
        "fsdp_blocks": blocks,
        "grad_checkpointing": case == "fsdp2_gc",
        "params": params,
        "local_params": local,  # this rank's share: params / processes under FSDP
        "imgs_per_sec": round(args.steps * args.batch_size / seconds, 1),
        "step_ms": round(1000 * seconds / args.steps, 1),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    if cuda:
        result |= {
            "device": torch.cuda.get_device_name(),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2),
        }
    if accelerator.is_main_process:
        print("RESULT " + json.dumps(result), flush=True)
    accelerator.wait_for_everyone()  # Collective: tear down together
    accelerator.end_training()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="fsdp_memory.json", help="where to write the JSON results")
    parser.add_argument("--cpu-smoke", action="store_true", help="dry run on CPU with test_vit at 32 px")
    parser.add_argument(
        "--model", default="", help="timm model (default vit_large_patch16_224; test_vit with --cpu-smoke)"
    )
    parser.add_argument("--imgsz", type=int, default=0, help="default 224 (32 with --cpu-smoke)")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (default 64; 8 with --cpu-smoke)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--case-timeout", type=int, default=150, help="seconds before a case counts as failed")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # inside a launched case
    args = parser.parse_args()
    args.model = args.model or ("test_vit" if args.cpu_smoke else "vit_large_patch16_224")
    args.imgsz = args.imgsz or (32 if args.cpu_smoke else 224)
    args.batch_size = args.batch_size or (8 if args.cpu_smoke else 64)
    if args.case:
        run_case(args.case, args)
        return
    results = []
    for case in args.cases.split(","):
        results.append(launch_case(case, args))
        print(json.dumps(results[-1]), flush=True)
        # After every case: a run stopped by its time limit still leaves what it measured.
        Path(args.out).write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"{'case':10} {'peak alloc GiB':>15} {'img/s':>8}  error")
    for r in results:
        peak, speed = r.get("peak_allocated_gib", "-"), r.get("imgs_per_sec", "-")
        print(f"{r['case']:10} {peak:>15} {speed:>8}  {r.get('error', '')[:80]}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
