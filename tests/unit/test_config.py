"""Config dataclasses, YAML loading and value coercion."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from trainer.config import (
    SECTIONS,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    UserError,
    build_config,
    coerce_value,
    field_docs,
    load_yaml,
)


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_validate_and_equal_empty_build():
    assert build_config({}) == Config()


def test_build_config_from_nested_sections():
    cfg = build_config(
        {
            "data": {"data": "digits", "imgsz": 16, "scale": [0.5, 1]},
            "model": {"model": "resnet18", "sync_bn": True},
            "optim": {"lr": 0.01, "min_lr": 0.0},
            "train": {"epochs": 3, "batch_size": 64},
            "run": {"tracker": "tensorboard,none", "exist_ok": "yes"},
        }
    )
    assert cfg.data == DataConfig(data="digits", imgsz=16, scale=(0.5, 1.0))
    assert cfg.model.model == "resnet18" and cfg.model.sync_bn is True
    assert cfg.optim.lr == 0.01 and cfg.optim.min_lr == 0.0
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 64)
    assert cfg.run.exist_ok is True
    assert cfg.run.trackers() == ["tensorboard"]


def test_unknown_key_is_named():
    with pytest.raises(UserError, match=r"unknown key\(s\) in train: epoch;") as e:
        build_config({"train": {"epoch": 3}})
    assert "epochs" in str(e.value)  # lists the valid keys, so the typo is easy to spot


def test_unknown_section_in_yaml_is_named(tmp_path):
    path = _write(tmp_path / "c.yaml", "trian:\n  epochs: 3\n")
    with pytest.raises(UserError, match=r"unknown section\(s\) trian"):
        load_yaml(path)


def test_build_config_rejects_unknown_section():
    with pytest.raises(UserError, match="trian"):
        build_config({"trian": {"epochs": 3}})


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"train": {"epochs": 0}}, "--epochs"),
        ({"train": {"batch_size": -8}}, "--batch-size"),
        ({"data": {"imgsz": 4}}, "--imgsz"),
        ({"run": {"tracker": "wandb,foo"}}, "--tracker 'foo'"),
        ({"train": {"mixed_precision": "fp8"}}, "--mixed-precision"),
        ({"data": {"val_fraction": 1.0}}, "--val-fraction"),
        ({"data": {"scale": [0.9, 0.5]}}, "--scale"),
        ({"optim": {"lr": 0.01, "min_lr": 0.1}}, "--min-lr"),
        ({"run": {"name": "a/b"}}, "--name"),
    ],
)
def test_bad_values_raise_user_error_naming_the_flag(values, flag):
    with pytest.raises(UserError) as e:
        build_config(values)
    assert str(e.value).startswith(flag)
    assert "\n" not in str(e.value)


def test_coerce_int_field():
    epochs = _field(TrainConfig, "epochs")
    assert coerce_value(epochs, "12", "train.epochs") == 12
    assert type(coerce_value(epochs, "12", "train.epochs")) is int
    assert coerce_value(epochs, 3.0, "train.epochs") == 3  # YAML `3.0` is still a whole number
    with pytest.raises(UserError, match=r"^train\.epochs expects int, got 'abc'$"):
        coerce_value(epochs, "abc", "train.epochs")
    with pytest.raises(UserError, match="expects int"):
        coerce_value(epochs, 2.5, "train.epochs")  # would silently truncate


def test_coerce_bool_field():
    sync_bn = _field(ModelConfig, "sync_bn")
    assert coerce_value(sync_bn, "yes", "x") is True
    assert coerce_value(sync_bn, "False", "x") is False
    assert coerce_value(sync_bn, True, "x") is True
    with pytest.raises(UserError, match="expects bool"):
        coerce_value(sync_bn, "maybe", "x")


def test_scale_parsing():
    assert build_config({"data": {"scale": "0.5,1"}}).data.scale == (0.5, 1.0)
    with pytest.raises(UserError, match="two comma-separated numbers"):
        build_config({"data": {"scale": "0.5,x"}})
    with pytest.raises(UserError, match="--scale must be two numbers"):
        build_config({"data": {"scale": "0.5"}})


@pytest.mark.parametrize(("text", "expected"), [("true", "default"), ("false", ""), ("null", ""), ("w.pth", "w.pth")])
def test_yaml_pretrained_values(tmp_path, text, expected):
    path = _write(tmp_path / "c.yaml", f"model:\n  pretrained: {text}\n")
    assert build_config(load_yaml(path)).model.pretrained == expected


def _non_default_config() -> Config:
    return Config(
        data=DataConfig(data="digits", imgsz=16, scale=(0.5, 1.0), hflip=0.25),
        model=ModelConfig(model="resnet18", pretrained="default", sync_bn=True),
        optim=OptimConfig(lr=0.01, min_lr=0.0, warmup_epochs=0.5),
        train=TrainConfig(epochs=3, batch_size=64, grad_accum=2, mixed_precision="bf16"),
        run=dataclasses.replace(Config().run, name="try", tracker="none", exist_ok=True),
    )


def test_yaml_round_trip_with_launch_section(tmp_path):
    cfg = _non_default_config()
    record = {**cfg.to_dict(), "launch": {"num_processes": 2, "sync_bn": False}}
    path = _write(tmp_path / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    assert build_config(load_yaml(path)) == cfg


def test_yaml_round_trip_of_run_folder_config(tmp_path):
    cfg = _non_default_config()
    record = {
        **cfg.to_dict(),
        "launch": {"num_processes": 2, "sync_bn": False},
        "dataset": {"source": "builtin:digits", "num_classes": 10, "class_names": [str(i) for i in range(10)]},
    }
    path = _write(tmp_path / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    assert build_config(load_yaml(path)) == cfg


def test_yaml_syntax_error_names_the_line(tmp_path):
    # YAML forbids tabs for indentation: the scanner fails on line 3.
    path = _write(tmp_path / "c.yaml", "train:\n  epochs: 3\n\tlr: 0.1\n")
    with pytest.raises(UserError, match=r"not valid YAML \(line 3\)"):
        load_yaml(path)


@pytest.mark.parametrize(
    ("text", "match"), [("- a\n- b\n", "expected a mapping of sections"), ("train: 5\n", "section train must be")]
)
def test_yaml_wrong_shape(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        load_yaml(_write(tmp_path / "c.yaml", text))


def test_empty_yaml_is_no_overrides(tmp_path):
    assert build_config(load_yaml(_write(tmp_path / "c.yaml", ""))) == Config()


def test_per_device_batch_size():
    assert TrainConfig(batch_size=128, grad_accum=2).per_device_batch_size(4) == 16
    # 10 does not divide by 2 processes x 2 accumulation steps; 8 is the nearest multiple of 4 below it.
    with pytest.raises(UserError, match=r"= 2 x 2 = 4; use e\.g\. --batch-size 8$"):
        TrainConfig(batch_size=10, grad_accum=2).per_device_batch_size(2)
    # Below the divisor the suggestion is the divisor itself.
    with pytest.raises(UserError, match=r"--batch-size 8$"):
        TrainConfig(batch_size=4, grad_accum=1).per_device_batch_size(8)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_field_has_a_docstring(section):
    cls = SECTIONS[section]
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{section} fields without help text: {missing}"


def test_plateau_refuses_warmup_in_steps():
    with pytest.raises(UserError, match="--sched plateau steps once per epoch"):
        OptimConfig(sched="plateau", warmup_steps=10)


def test_every_preset_builds_a_config():
    from pathlib import Path

    # sweep.yaml is a wandb sweep config, not a run preset (tests/unit/test_sweep_config.py checks it).
    presets = sorted(p for p in (Path(__file__).parents[2] / "configs").glob("*.yaml") if p.name != "sweep.yaml")
    assert len(presets) >= 2
    for preset in presets:
        assert build_config(load_yaml(str(preset))).optim.ema is True
