"""Every shipped accelerate config loads, in plain YAML and in accelerate's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

CONFIG_DIR = Path(__file__).resolve().parents[2] / "accelerate_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
KNOWN_DISTRIBUTED_TYPES = {"NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "FSDP", "DEEPSPEED", "XLA"}


def test_configs_are_shipped():
    assert len(CONFIGS) >= 4, CONFIG_DIR


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict)
    assert raw["distributed_type"] in KNOWN_DISTRIBUTED_TYPES
    assert isinstance(raw["num_processes"], int) and raw["num_processes"] >= 1
    assert raw["mixed_precision"] in ("no", "fp16", "bf16")
    loaded = load_config_from_file(str(path))  # rejects unknown keys and bad enum values
    assert loaded.num_processes == raw["num_processes"]
    assert str(loaded.distributed_type).removeprefix("DistributedType.") == raw["distributed_type"]


def test_cpu_2proc_starts_two_real_ranks():
    # MULTI_GPU + use_cpu goes through torchrun and starts 2 processes; MULTI_CPU without mpirun starts one.
    raw = yaml.safe_load((CONFIG_DIR / "cpu_2proc.yaml").read_text())
    assert raw["distributed_type"] == "MULTI_GPU"
    assert raw["use_cpu"] is True
    assert raw["num_processes"] == 2
