"""configs/sweep.yaml run as a wandb agent runs it: the command with ${args} expanded, and every value lands."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, check, config_of, run
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
from wandb_file import read_run

from trainer.cli import build_parser

# Small enough for a CPU test; none of these is swept. Appended last, so they win over the command's fixed flags.
FAST = ["--data", "digits", "--imgsz", "16", "--epochs", "1"]


def _pick(name: str, spec: dict, defaults: dict):
    """One value per parameter: the first listed one that differs from the default (so landing proves something),
    or a value inside a distribution's range."""
    if "values" in spec:
        return next((v for v in spec["values"] if v != defaults.get(name)), spec["values"][0])
    low, high = spec["min"], spec["max"]
    if isinstance(low, int) and isinstance(high, int):
        return (low + high) // 2
    return math.sqrt(low * high) if spec.get("distribution", "").startswith("log") else (low + high) / 2


def _agent_command(command: list, args: list[str]) -> list[str]:
    """wandb_agent.Agent._command_run: each `${macro}` element becomes its list, the rest is passed as is."""
    macros = {"env": ["/usr/bin/env"], "interpreter": [sys.executable], "args": args}
    out: list[str] = []
    for c in map(str, command):
        out += macros[c[2:-1]] if c.startswith("${") and c.endswith("}") else [c]
    return out


def test_sweep_values_reach_the_run(workdir: Path):
    sweep = yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text())
    _, dests = build_parser()
    defaults = {n.replace("_", "-"): f.default for n, (_, f) in dests.items()}
    picked = {name: _pick(name, spec, defaults) for name, spec in sweep["parameters"].items()}
    # wandb's own formatting: `--name=value`, booleans as True/False.
    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in picked.items()}})["args"]
    assert any(a.endswith("=True") or a.endswith("=False") for a in args)
    command = _agent_command(sweep["command"], args) + FAST
    proc = check(run(command, workdir, timeout=300, WANDB_MODE="offline"))

    run_dir = workdir / "runs" / "sweep" / "exp"
    cfg = config_of(run_dir)
    for name, value in picked.items():
        section, f = dests[name.replace("-", "_")]
        landed = cfg[section][f.name]
        if isinstance(value, str) and "," in value:  # --scale=0.5,1.0 -> [0.5, 1.0]
            value = [float(x) for x in value.split(",")]
        assert landed == (pytest.approx(value) if isinstance(value, float) else value), (name, landed, value)
    assert cfg["run"]["tracker"] == "wandb", proc.stdout

    # The sweep's metric is a key of the run's wandb summary.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    summary = read_run(next(offline[0].glob("run-*.wandb"))).summary
    assert 0.0 <= summary[sweep["metric"]["name"]] <= 1.0, summary
