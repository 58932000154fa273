"""Command line: one-line errors with exit code 2, --help, and defaults < YAML < flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from trainer.cli import build_parser, main, resolve_config
from trainer.config import SECTIONS, Config
from trainer.flags import bare_tta


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # main prints errors on local rank 0 only


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus; see `trainer train --help`"),
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


@pytest.mark.parametrize(
    ("argv", "ema"),
    [
        ([], False),
        (["--ema"], True),
        (["--no-ema"], False),
        (["--ema=True"], True),  # what a wandb sweep agent passes
        (["--ema=False"], False),
        (["--ema=true"], True),
        (["--ema=false"], False),
        (["--ema=1"], True),
        (["--ema=0"], False),
        (["--ema=yes"], True),
        (["--ema=NO"], False),
        (["--ema", "false"], False),  # wandb's ${args_no_equals}
        (["--ema", "--no-ema"], False),  # the last one wins, as for every flag
    ],
)
def test_boolean_flags_take_the_sweep_agents_values(argv, ema):
    assert _resolve(["train", *argv]).optim.ema is ema


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--ema=maybe"], "--ema expects true or false (or 1/0, yes/no), got 'maybe'"),
        (["--sync-bn="], "--sync-bn expects true or false (or 1/0, yes/no), got ''"),
        (["--no-ema=True"], "--no-ema takes no value; use --ema=true or --ema=false"),
    ],
)
def test_a_bad_boolean_is_one_line_exit_2(capsys, argv, expected):
    assert main(["train", *argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"trainer: error: {expected}; see `trainer train --help`"]


def test_every_flag_takes_key_equals_value():
    """The agent passes `--name=value` for every parameter: ints, floats, tuples, strings, choices, --pretrained."""
    cfg = _resolve(
        [
            "train",
            "--epochs=3",
            "--lr=0.0003",
            "--weight-decay=1e-05",
            "--hflip=-1",
            "--scale=0.5,1.0",
            "--model=resnet18",
            "--mixed-precision=bf16",
            "--loader=torch",
            "--pretrained=w.safetensors",
            "--tracker=none",
            "--smoothing=0.2",
            "--deterministic=True",
        ]
    )
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.data.hflip) == (3, 3e-4, 1e-5, -1.0)
    assert (cfg.data.scale, cfg.model.model, cfg.train.mixed_precision) == ((0.5, 1.0), "resnet18", "bf16")
    assert (cfg.data.loader, cfg.model.pretrained, cfg.run.tracker) == ("torch", "w.safetensors", "none")
    assert (cfg.train.label_smoothing, cfg.train.deterministic) == (0.2, True)
    assert _resolve(["train", "--pretrained="]).model.pretrained == ""  # an empty value: random init


# The flags that a boolean value is valid only with.
_NEEDS = {
    "--teacher-pretrained=True": ["--teacher", "resnet18"],
    "--teacher-pretrained=False": ["--teacher", "resnet18", "--teacher-weights", "teacher.safetensors"],
}


def test_every_boolean_field_takes_a_value():
    fields = [(f.name, f.default) for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    booleans = [(name, default) for name, default in fields if isinstance(default, bool)]
    assert booleans
    for name, default in booleans:
        flag = "--" + name.replace("_", "-")
        parser, dests = build_parser()
        values = [
            getattr(
                getattr(resolve_config(parser.parse_args(["train", *_NEEDS.get(arg, []), arg]), dests), dests[name][0]),
                name,
            )
            for arg in (f"{flag}={not default}", f"{flag}={default}")
        ]
        assert values == [not default, default], flag


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # Prefixes of real flags: argparse would have taken them for the full flag.
        (["train", "--keep", "3"], "unrecognized arguments: --keep; did you mean --keep-checkpoints?"),
        (["train", "--patience-ep=2"], "unrecognized arguments: --patience-ep; did you mean --patience-epochs?"),
        (
            ["train", "--warmup", "1"],
            "unrecognized arguments: --warmup; did you mean --warmup-epochs, --warmup-lr or --warmup-steps?",
        ),
        (["train", "--ema-w"], "unrecognized arguments: --ema-w; did you mean --ema-warmup?"),
        (["train", "--no-ema-w"], "unrecognized arguments: --no-ema-w; did you mean --no-ema-warmup?"),
        # A sweep config keyed by the Python name, and a near spelling.
        (["train", "--weight_decay=0.1"], "unrecognized arguments: --weight_decay; did you mean --weight-decay?"),
        (["train", "--ema-decy", "0.9"], "unrecognized arguments: --ema-decy; did you mean --ema-decay?"),
        (["train", "--bogus"], "unrecognized arguments: --bogus; see `trainer train --help`"),
        (
            ["train", "--bogus", "--keep=3"],
            "unrecognized arguments: --bogus, --keep (--keep-checkpoints?); see `trainer train --help`",
        ),
        (["val", "--weights", "w", "--batch", "8"], "unrecognized arguments: --batch; did you mean --batch-size?"),
        (["data", "convert", "a", "b", "--shard=5"], "unrecognized arguments: --shard; did you mean --shard-size?"),
    ],
)
def test_abbreviations_are_refused_naming_the_full_flag(capsys, argv, expected):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"trainer: error: {expected}"]


def test_no_parser_takes_abbreviations():
    parser, _ = build_parser()
    parsers, seen = [parser], []
    while parsers:
        p = parsers.pop()
        seen.append(p.prog)
        assert p.allow_abbrev is False, p.prog
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    assert {"trainer", "trainer train", "trainer val", "trainer data convert"} <= set(seen)


def test_boolean_help_shows_both_forms(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--ema[=BOOL], --no-ema" in capsys.readouterr().out


def test_debug_with_a_value_shows_the_exception():
    from trainer.config import UserError

    with pytest.raises(UserError, match="--epochs"):
        main(["train", "--epochs", "0", "--debug=True"])


@pytest.mark.parametrize(
    ("argv", "tta", "sources"),
    [
        (["val", "--weights", "w", "--tta"], "flip", None),  # bare: flip
        (["val", "--tta", "--weights", "w"], "flip", None),
        (["val", "--weights", "w", "--tta", "crops"], "crops", None),
        (["predict", "--weights", "w", "--tta", "a.png", "b.png"], "flip", ["a.png", "b.png"]),  # a SOURCE, no mode
        (["predict", "--weights", "w", "a.png", "--tta"], "flip", ["a.png"]),
        (["predict", "--weights", "w", "--tta", "crops", "a.png"], "crops", ["a.png"]),
        (["predict", "--weights", "w", "a.png"], None, ["a.png"]),
    ],
)
def test_a_bare_tta_means_flip(argv, tta, sources):
    parser, _ = build_parser()
    args = parser.parse_args(bare_tta(argv))
    assert args.tta == tta and getattr(args, "sources", None) == sources


def test_an_unknown_tta_mode_is_one_line(capsys):
    assert main(["val", "--weights", "w", "--tta", "mirror"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "trainer: error: argument --tta: invalid choice: 'mirror' (choose from 'flip', 'crops'); "
        "see `trainer val --help`"
    ]
