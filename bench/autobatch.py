"""--batch-size auto on a GPU: what the probe finds, how long it takes, and whether a real step fits at that size.

For each model: trainer.train.autobatch's probe (forward + backward at bf16 autocast, channels_last for CNNs) finds the
largest per-device batch; then one real training step (AdamW, whose state the probe leaves out) runs at the batch
used (90 %) and its peak memory is recorded as a fraction of the GPU's. Writes a JSON list.
Usage: python bench/autobatch.py [--cpu-smoke] --out autobatch.json
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch
from accelerate import Accelerator

from trainer.train.autobatch import largest_batch, training_probe, with_margin

CASES = [("resnet50", 224, True), ("vit_base_patch16_224", 224, False)]


def measure(accelerator, name: str, imgsz: int, channels_last: bool, ceiling: int, limit: int | None) -> dict:
    model = timm.create_model(name, num_classes=1000)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    probe = training_probe(accelerator, model, 3, imgsz, 1000, channels_last)
    if limit is not None:  # --cpu-smoke: a simulated memory limit
        real = probe

        def probe(size: int, real=real) -> None:
            if size > limit:
                raise torch.OutOfMemoryError("simulated")
            real(size)

    start = time.time()
    found = largest_batch(probe, ceiling=ceiling)
    seconds = time.time() - start
    used = with_margin(found)
    record = {"model": name, "imgsz": imgsz, "found": found, "used": used, "probe_s": round(seconds, 1)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images = torch.randn(used, 3, imgsz, imgsz, device=accelerator.device)
    with accelerator.autocast():
        loss = model(images).float().logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    if accelerator.device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        record["step_peak_fraction"] = round(torch.cuda.max_memory_allocated() / total, 3)
    del model, optimizer, images, loss
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny: test_resnet at 32 px, limit simulated")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=args.cpu_smoke or not torch.cuda.is_available(), mixed_precision="bf16")
    if args.cpu_smoke:
        records = [measure(accelerator, "test_resnet", 32, True, ceiling=64, limit=40)]
    else:
        records = [measure(accelerator, name, size, cl, ceiling=4096, limit=None) for name, size, cl in CASES]
    print(json.dumps(records, indent=1))
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
