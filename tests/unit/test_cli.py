"""Command line: one-line errors with exit code 2, --help, and defaults < YAML < flags."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.cli import build_parser, main, resolve_config
from trainer.config import SECTIONS, Config


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # main prints errors on local rank 0 only


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["train", "--epochs", "abc"], "--epochs expects int, got 'abc'"),
        (["train", "--config", "missing.yaml"], "--config missing.yaml: file not found"),
        (["train", "--tracker", "foo"], "--tracker 'foo' is unknown"),
        (["train", "--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
        ([], "required: command"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)  # `missing.yaml` must not exist
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trainer: error: ")
    assert expected in lines[0]


def test_debug_shows_the_exception():
    from trainer.config import UserError

    with pytest.raises(UserError, match="--epochs"):
        main(["train", "--epochs", "0", "--debug"])


def test_train_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--batch-size", "--sync-bn", "--imgsz", "--config", "--no-sync-bn"):
        assert flag in out
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in out


def test_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("trainer ")


def _resolve(argv: list[str]) -> Config:
    parser, dests = build_parser()
    return resolve_config(parser.parse_args(argv), dests)


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.01\n")
    from_yaml = _resolve(["train", "--config", str(path)])
    assert (from_yaml.train.epochs, from_yaml.optim.lr) == (3, 0.01)
    cfg = _resolve(["train", "--config", str(path), "--epochs", "7"])
    assert cfg.train.epochs == 7  # flag beats YAML
    assert cfg.optim.lr == 0.01  # YAML beats default
    assert cfg.train.batch_size == Config().train.batch_size  # untouched: default


def test_flags_are_typed():
    cfg = _resolve(["train", "--scale", "0.5,1", "--sync-bn", "--pretrained", "--imgsz", "48", "--no-exist-ok"])
    assert cfg.data.scale == (0.5, 1.0)
    assert cfg.model.sync_bn is True
    assert cfg.model.pretrained == "default"  # bare --pretrained means timm's default weights
    assert cfg.data.imgsz == 48
    assert cfg.run.exist_ok is False
    assert _resolve(["train", "--pretrained", "w.safetensors"]).model.pretrained == "w.safetensors"


def test_flag_overrides_empty_yaml_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n")
    assert _resolve(["train", "--config", str(path), "--epochs", "7"]).train.epochs == 7


def test_smoothing_is_an_alias_of_label_smoothing():
    assert _resolve(["train", "--smoothing", "0.2"]).train.label_smoothing == 0.2
    assert _resolve(["train", "--compile", "--compile-mode", "max-autotune"]).train.compile_mode == "max-autotune"
