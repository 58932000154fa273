"""Write README.md's sample output from a real run of `trainer train`, so the front page shows what trainer prints.

    python tools/readme_sample.py            # run the default `trainer train` (2-3 minutes on 2 CPU cores), rewrite
    python tools/readme_sample.py --check    # a 1-epoch run on the small digits; exit 1 if README's block differs

The block between README's two markers is the run's stdout as it came, times and throughput included, with two
cuts: the plain progress lines printed every 30 s where stdout is not a terminal are left out (on a terminal they
are a bar that gives way to the epoch line), and the per-class table keeps its header, the `all` row and the first
class. A line under it names the date, the machine and its load.

`--check` and tests/unit/test_docs.py compare the shape of the lines, not their numbers: which lines, which words,
in which order, with every number as `#`, the model, data and device names as MODEL, DATA and DEVICE, repeated
lines (epochs, per-class rows) as one and the `*best` mark ignored. A change of the terminal report's format fails
them until this script is run again. wandb's own line (printed only without credentials) is not compared.

The run starts in a fresh temporary folder (so the run folder is `runs/train/exp`), with this checkout first on the
path and without WANDB_API_KEY/WANDB_MODE, as a new user's first run; on a machine logged in to wandb (~/.netrc) it
logs offline instead of uploading.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- sample output: written by tools/readme_sample.py from a real run; do not edit by hand -->"
END = "<!-- end of sample output -->"
# The cheap run whose lines --check and the unit test compare with README's: same report, 1 epoch of 1,617 digits.
TINY_RUN = ["train", "--data", "digits", "--model", "test_resnet", "--imgsz", "16", "--epochs", "1"]
TINY_RUN += ["--batch-size", "64", "--tracker", "none"]

PROGRESS = re.compile(r"^  epoch \d+/\d+  \d+/\d+ ")  # trainer.report.progress's plain line
NUMBER = re.compile(r"(?<![A-Za-z_])\d+(?:\.\d+)?(?:e[-+]?\d+)?")  # not the 1 of top1 or f1
HEADER = re.compile(r"^(\S+) on (\S+) \(")  # the run's first line: `MODEL on DATA (...`
DEVICE = re.compile(r"\bon (cpu|cuda|mps|xpu)\b")  # the README's run was on a CPU; the test may run on a GPU
ELIDED = "         ..."


def shown(stdout: str) -> list[str]:
    """The lines README shows of a run's stdout: progress lines dropped, the per-class table cut to three rows."""
    lines = [line for line in stdout.splitlines() if not PROGRESS.match(line)]
    out: list[str] = []
    table = -1  # rows of the per-class table seen so far; -1: not in it
    for line in lines:
        if line.startswith("per-class "):
            out.append(line)
            table = 0
            continue
        if table >= 0 and line.startswith(" "):
            table += 1
            if table <= 3:  # header, `all`, the first class
                out.append(line)
            elif table == 4:
                out.append(ELIDED)
            continue
        table = -1
        out.append(line)
    return out


def line_shapes(lines: list[str]) -> list[str]:
    """What must agree between two runs' reports: the lines and their words in order, numbers and names aside."""
    header = next((HEADER.match(line) for line in lines if HEADER.match(line)), None)
    if header is None:
        raise ValueError("no `MODEL on DATA (...)` line: not the output of trainer train")
    model, source = header.groups()
    shapes: list[str] = []
    for line in lines:
        if line.startswith("wandb:") or line.strip() == "...":
            continue
        shape = DEVICE.sub("on DEVICE", line.replace(source, "DATA").replace(model, "MODEL"))
        shape = " ".join(NUMBER.sub("#", shape).replace("*best", "").split())
        if not shapes or shapes[-1] != shape:
            shapes.append(shape)
    return shapes


def readme_lines(text: str) -> list[str]:
    """The output lines of README's sample block (inside its code fence)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    fenced = re.search(r"^```[^\n]*\n(.*?)^```", block, flags=re.M | re.S)
    if fenced is None:
        raise ValueError("README.md's sample block holds no code fence")
    return fenced.group(1).splitlines()


def machine() -> str:
    """`2-core AMD EPYC 7B13`: the CPU model from /proc/cpuinfo where there is one, and the core count."""
    name = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        name = found.group(1).strip() if found else name
    except OSError:
        pass
    return f"{os.cpu_count()}-core {name}"


def render(lines: list[str], note: str) -> str:
    return "\n".join([BEGIN, "```", *lines, "```", "", note, END])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    from trainer.report.trackers import wandb_has_credentials

    if wandb_has_credentials():  # a logged-in machine: keep the sample run off the user's wandb account
        env["WANDB_MODE"] = "offline"
    return env


def run_trainer(args: list[str]) -> str:
    """stdout of `python -m trainer ARGS` run in a fresh temporary folder; stderr passes through."""
    with tempfile.TemporaryDirectory(prefix="readme-sample-") as folder:
        done = subprocess.run(
            [sys.executable, "-m", "trainer", *args], cwd=folder, env=_env(), stdout=subprocess.PIPE, text=True
        )
    if done.returncode != 0:
        sys.exit(f"python -m trainer {' '.join(args)} failed (exit {done.returncode}); README.md left as it was")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write README.md's sample output from a real `trainer train` run.")
    parser.add_argument("--check", action="store_true", help="exit 1 if a 1-epoch run's lines differ in shape")
    check = parser.parse_args(argv).check
    text = README.read_text()
    current = readme_lines(text)
    if check:
        expected = line_shapes(shown(run_trainer(TINY_RUN)))
        if line_shapes(current) != expected:
            print("README.md's sample output is stale: run python tools/readme_sample.py", file=sys.stderr)
            return 1
        return 0
    # Other jobs' load, taken before the run (whose own process would count in it after).
    load = f", load average {os.getloadavg()[0]:.1f} before the run" if hasattr(os, "getloadavg") else ""
    lines = shown(run_trainer(["train"]))
    text = README.read_text()  # again: the run takes minutes, and README may have been edited meanwhile
    if os.environ.get("OMP_NUM_THREADS"):
        load += f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    note = (
        f"(`trainer train` on a {machine()}{load}, {datetime.date.today().isoformat()}; written by "
        "`python tools/readme_sample.py`. Times and accuracy vary with the machine: measured figures are in "
        "[Benchmarks](docs/benchmarks.md).)"
    )
    start, end = text.index(BEGIN), text.index(END) + len(END)
    README.write_text(
        text[:start]
        + render(lines, textwrap.fill(note, 118, break_long_words=False, break_on_hyphens=False))
        + text[end:]
    )
    print(f"wrote README.md's sample output ({len(lines)} lines)")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
