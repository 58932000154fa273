"""configs/sweep.yaml: a wandb sweep whose parameters are real `trainer train` flags and reach the command."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import yaml

from trainer.cli import build_parser, resolve_config

SWEEP = Path(__file__).resolve().parents[2] / "configs" / "sweep.yaml"


@pytest.fixture(scope="module")
def sweep() -> dict:
    return yaml.safe_load(SWEEP.read_text())


def _train_flags() -> set[str]:
    parser, _ = build_parser()
    return set(parser._chosen_parser(parser.parse_args(["train"])).long_options())


def test_command_passes_the_swept_values(sweep):
    """Without ${args} the agent would run every trial with the defaults (wandb#5257)."""
    command = [str(c) for c in sweep["command"]]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "trainer", "train"]
    assert command.count("${args}") == 1
    fixed = [c for c in command[5:] if c != "${args}"]
    _resolve(fixed)  # the fixed flags are valid on their own


def test_metric_is_what_the_run_reports(sweep):
    assert sweep["method"] in ("bayes", "random", "grid")
    assert sweep["metric"] == {"name": "best/val_top1", "goal": "maximize"}  # the summary key engine.train() logs


def test_every_parameter_is_a_train_flag(sweep):
    flags = _train_flags()
    unknown = [name for name in sweep["parameters"] if f"--{name}" not in flags]
    assert not unknown, f"not trainer train flags: {unknown}"
    assert {"lr", "weight-decay", "model", "ema"} <= set(sweep["parameters"])


def test_every_listed_value_builds_a_config(sweep):
    """Each value, passed as the agent passes it (`--name=value`, booleans as True/False), is a valid run."""
    for name, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec["min"], spec["max"]]
        for value in values:
            _resolve([f"--{name}={value}"])
    for model in sweep["parameters"]["model"]["values"]:
        assert timm.is_model(model), model


def _resolve(argv: list[str]):
    parser, dests = build_parser()
    return resolve_config(parser.parse_args(["train", *argv]), dests)
