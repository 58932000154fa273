"""Memory of a training run: peak RSS, and whether RSS stays flat from the end of epoch 2 to the end.

Runs `trainer train ARGS` in a fresh process (HOME and working folder in a temporary directory), samples the
process's resident set size from /proc every 0.1 s, and notes it as each epoch line is printed. Prints peak RSS,
RSS at the end of every epoch, and the spread of all samples from the end of epoch 2 to the end of the last
epoch (goal: within 5 %). Linux only. The wandb service runs in its own process and is not counted.

    python bench/memory.py                       # the default run (MNIST, resnet10t, 5 epochs, wandb offline)
    python bench/memory.py --data digits --epochs 6 --tracker none
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else None


def main() -> None:
    args = sys.argv[1:]
    samples: list[tuple[float, float]] = []  # (time, RSS MB)
    epoch_ends: list[tuple[int, float, float]] = []  # (epoch, time, RSS MB)
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "HF_"))}
        env.update(HOME=tmp, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", "train", *args],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        peak = [0.0]

        def read_output() -> None:
            for line in proc.stdout:
                print(line, end="", flush=True)
                m = re.match(r"epoch (\d+)/\d+ ", line)
                if m and (rss := rss_mb(proc.pid)) is not None:
                    epoch_ends.append((int(m.group(1)), time.time(), rss))

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        while proc.poll() is None:
            if (rss := rss_mb(proc.pid)) is not None:
                samples.append((time.time(), rss))
                peak[0] = max(peak[0], rss_mb(proc.pid, "VmHWM") or 0.0)
            time.sleep(0.1)
        reader.join()
    if proc.returncode != 0 or not epoch_ends:
        sys.exit(f"the run failed (exit {proc.returncode})")
    print(f"\npeak RSS (VmHWM) {peak[0]:.0f} MB")
    for epoch, _, rss in epoch_ends:
        print(f"RSS at the end of epoch {epoch}: {rss:.0f} MB")
    # Training from the end of epoch 2 to the end of the last epoch (start-up and teardown left out).
    after = [rss for t, rss in samples if len(epoch_ends) >= 3 and epoch_ends[1][1] <= t <= epoch_ends[-1][1]]
    if len(epoch_ends) < 3 or not after:
        print("RSS flatness needs 3 or more epochs")
        return
    low, high = min(after), max(after)
    print(
        f"RSS from the end of epoch 2 to the end of the last: {low:.0f}-{high:.0f} MB, "
        f"spread {100 * (high - low) / low:.1f} % "
        f"(goal <= 5 %); end of epoch 2 -> end of epoch {epoch_ends[-1][0]}: "
        f"{100 * (epoch_ends[-1][2] - epoch_ends[1][2]) / epoch_ends[1][2]:+.1f} %"
    )


if __name__ == "__main__":
    main()
