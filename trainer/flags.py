"""The flags of every command: train's from the config dataclasses (one `--flag` per field, named after it, its help
from the field's docstring), and the small sets of lr-find, val, predict, export, benchmark and `data`; argparse's
errors as one line (a misspelled flag names the real ones it could have meant); the values given, typed. cli.py
builds the parser from these parts and runs the command chosen."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any

from trainer.config import (
    COMPILE_MODES,
    LOADERS,
    MIXED_PRECISION,
    SECTIONS,
    UserError,
    coerce_value,
    field_docs,
    load_yaml,
)

# Second names users of timm's train.py already type.
ALIASES = {"label_smoothing": ("--smoothing",)}
METAVARS = {"progressive": "START_PX", "progressive_ramp": "A,B"}  # where the type alone says too little


class BoolFlag(argparse.Action):
    """`--ema`, `--no-ema`, and the `--ema=VALUE` a wandb sweep agent passes (`--ema=True`): true/false, 1/0, yes/no,
    in any case. argparse's BooleanOptionalAction refuses a value ("ignored explicit argument 'True'")."""

    def __init__(self, option_strings: list[str], dest: str, field: dataclasses.Field, **kwargs):
        negated = ["--no-" + s[2:] for s in option_strings if s.startswith("--")]
        super().__init__([*option_strings, *negated], dest, nargs="?", metavar="BOOL", **kwargs)
        self.field = field

    def __call__(self, parser, namespace, value, option_string=None):
        flag = self.option_strings[0]
        if option_string != flag:  # --no-ema
            if value is not None:
                raise argparse.ArgumentError(None, f"{option_string} takes no value; use {flag}=true or {flag}=false")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if value is None else coerce_value(self.field, value, flag))
        except UserError:
            message = f"{flag} expects true or false (or 1/0, yes/no), got {value!r}"
            raise argparse.ArgumentError(None, message) from None


class HelpFormatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            return ", ".join(f"{s}[=BOOL]" if not s.startswith("--no-") else s for s in action.option_strings)
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No prefix matching: `--patience` must not silently mean `--patience-epochs`, today or after a new flag.
        kwargs.update(allow_abbrev=False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line instead of argparse's usage dump
        raise UserError(f"{message}; see `{self.prog} --help`")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._chosen_parser(parsed)
            raise UserError(unrecognized(extras, parser.long_options(), parser.prog))
        return parsed

    def _chosen_parser(self, parsed: argparse.Namespace) -> Parser:
        """The (sub)command the arguments chose: `trainer data convert` -> its own parser."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)]._chosen_parser(parsed)
        return self

    def long_options(self) -> list[str]:
        return sorted(s for s in self._option_string_actions if s.startswith("--"))


def unrecognized(extras: list[str], options: list[str], prog: str) -> str:
    """One line naming the unknown flags and the real ones each could have meant (a prefix, or a near spelling)."""
    flags = [x.split("=", 1)[0] for x in extras if x.startswith("-")] or extras
    guesses = {flag: _meant(flag, options) for flag in flags}
    if len(flags) == 1 and guesses[flags[0]]:
        return f"unrecognized arguments: {flags[0]}; did you mean {_either(guesses[flags[0]])}?"
    named = ", ".join(f"{f} ({_either(g)}?)" if g else f for f, g in guesses.items())
    return f"unrecognized arguments: {named}; see `{prog} --help`"


def _meant(flag: str, options: list[str]) -> list[str]:
    spelled = flag.replace("_", "-")  # `--weight_decay`: sweep configs keyed by the Python name
    if spelled in options:
        return [spelled]
    started = [o for o in options if o.startswith(spelled) and len(spelled) > 2]
    return started or difflib.get_close_matches(spelled, options, n=3, cutoff=0.75)


def _either(names: list[str]) -> str:
    if len(names) > 4:
        return f"one of {', '.join(names[:4])}, ..."
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _metavar(f: dataclasses.Field) -> str:
    """STR, INT or FLOAT from the field's annotation ("int | None" -> INT; --batch-size also takes `auto`)."""
    if f.name == "batch_size":
        return "INT|auto"
    kinds = [t.strip() for t in str(f.type).split("|") if t.strip() != "None"]
    return kinds[0].upper() if kinds else "VALUE"


def add_config_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, dataclasses.Field]]:
    """One flag per config field, named after it (`batch_size` -> `--batch-size`), help from its docstring."""
    dests = {}
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            shown = (
                {"": "empty", " ": "space", None: "unset"}.get(f.default, f.default)
                if not isinstance(f.default, tuple)
                else f.default
            )
            kwargs: dict = dict(
                dest=f.name,
                default=argparse.SUPPRESS,
                help=f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%"),
            )
            if isinstance(f.default, bool):
                kwargs.update(action=BoolFlag, field=f)
            elif f.name == "pretrained":
                kwargs.update(nargs="?", const="default", metavar="PATH")
            elif f.name in ("mixed_precision", "compile_mode", "loader"):
                kwargs["choices"] = {"mixed_precision": MIXED_PRECISION, "compile_mode": COMPILE_MODES}.get(
                    f.name, LOADERS
                )
            else:
                kwargs["metavar"] = METAVARS.get(f.name) or ("MIN,MAX" if isinstance(f.default, tuple) else _metavar(f))
            group.add_argument(flag, *ALIASES.get(f.name, ()), **kwargs)
            dests[f.name] = (section, f)
    return dests


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {value}")
    return value


def given_values(args: argparse.Namespace, dests: dict) -> dict[str, dict[str, Any]]:
    """The settings the user gave: the YAML file, then the flags on the command line (typed, not yet validated)."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    for name, (section, f) in dests.items():
        if name in vars(args):
            flag = "--" + name.replace("_", "-")
            values.setdefault(section, {})[name] = coerce_value(f, getattr(args, name), flag)
    return values


EXPORT_FORMATS = ("torchscript", "onnx", "openvino", "engine", "coreml", "hf")  # trainer.use.export.artifacts'


def add_export_flags(export: argparse.ArgumentParser) -> None:
    """`trainer export`'s own flags (--weights is the use commands' common one)."""
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="onnx",
        help="onnx (default), torchscript, openvino, engine (TensorRT, GPU), coreml, hf (timm hub folder)",
    )
    export.add_argument(
        "--output", metavar="PATH", help="default: beside the weights (best.onnx, best_int8.onnx, best_openvino/, ...)"
    )
    export.add_argument("--data", help="data to check (and calibrate --int8) on (default: the run's own)")
    export.add_argument(
        "--check-images", type=positive_int, help="validation images the export is checked on (default: all)"
    )
    export.add_argument("--int8", action="store_true", help="onnx/openvino: int8, calibrated on training images")
    export.add_argument(
        "--calib-images", type=positive_int, default=300, help="training images --int8 calibrates on (300)"
    )
    export.add_argument(
        "--half", action="store_true", help="fp16: onnx and engine on a GPU; openvino: fp16 weights (runs f32)"
    )
    export.add_argument("--bf16", action="store_true", help="openvino: run with the bf16 precision hint")
    export.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="with --format hf: also upload to the HF hub (needs credentials)"
    )


def add_benchmark_flags(benchmark: argparse.ArgumentParser) -> None:
    """`trainer benchmark`'s own flags."""
    benchmark.add_argument(
        "--formats",
        help="comma-separated; default torchscript,onnx,onnx-int8,openvino,openvino-bf16,openvino-int8 (+engine-fp16 "
        "on a GPU); also openvino-fp16, coreml, engine",
    )
    benchmark.add_argument("--data", help="data to validate on (default: the run's own)")
    benchmark.add_argument("--check-images", type=positive_int, help="validation images per format (default: all)")
    benchmark.add_argument("--batch-size", type=positive_int, default=32, help="batch of the throughput figure (32)")
    benchmark.add_argument("--rounds", type=positive_int, default=5, help="timed rounds; medians are reported (5)")
    benchmark.add_argument("--calib-images", type=positive_int, default=300, help="for the int8 formats (300)")
    benchmark.add_argument("--tracker", choices=("none", "wandb"), default="none", help="also log the table to wandb")
    add_run_folder(benchmark, "runs/benchmark")


def add_lr_find(commands) -> None:
    """`trainer lr-find`: train's flags plus the sweep's own (trainer.train.lr_find)."""
    lr_find = commands.add_parser(
        "lr-find",
        help="sweep the learning rate exponentially and suggest one (advisory)",
        description="Train a throwaway copy of the run's model for --steps updates at exponentially rising learning "
        "rates; write lr_find.csv and lr_find.png to runs/lr_find/exp and print a suggested --lr. Takes train's "
        "flags; runs plainly or under accelerate launch / torchrun.",
    )
    lr_find.add_argument("--config", metavar="YAML", help="run config, as for train; flags override it")
    lr_find.add_argument("--steps", type=positive_int, default=200, help="optimizer updates in the sweep (200)")
    lr_find.add_argument("--start-lr", type=float, default=1e-7, help="first learning rate (1e-7)")
    lr_find.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (10)")
    add_config_flags(lr_find)


TTA_MODES = ("flip", "crops")  # trainer.use.tta's, without importing torch for --help
CAM_METHODS = (  # trainer.report.heatmaps.METHODS
    *("gradcam", "gradcam++", "hirescam", "xgradcam"),
    *("layercam", "eigencam", "eigengradcam", "gradcamelementwise"),
)


def add_cam(command, what: str) -> None:
    """--cam and --cam-method (trainer.report.heatmaps's methods, without importing torch for --help)."""
    command.add_argument("--cam", action="store_true", help=f"class-activation heatmaps (grad-cam) {what}")
    command.add_argument("--cam-method", choices=CAM_METHODS, default="gradcam", help="with --cam (default: gradcam)")


TTA_HELP = (
    "test-time augmentation: average the logits over the image and its flip (flip; a bare --tta), or over ten crops "
    "(crops)"
)
TTA_FLAG = dict(nargs="?", const="flip", choices=TTA_MODES, metavar="{flip,crops}", help=TTA_HELP)


def bare_tta(argv: list[str]) -> list[str]:
    """`trainer predict ... --tta a.png`: a bare --tta before the SOURCEs, which argparse would take for its value."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command != "predict":
        return argv
    return [
        "--tta=flip" if a == "--tta" and n + 1 < len(argv) and argv[n + 1] not in TTA_MODES else a
        for n, a in enumerate(argv)
    ]


def add_run_folder(command, project: str) -> None:
    """--project, --name, --exist-ok: where a command that is not `train` writes its run folder."""
    folder = "run folder {project}/{name}, incremented (exp, exp2, ...) unless --exist-ok"
    command.add_argument("--project", default=project, help=folder)
    command.add_argument("--name", default="exp", help=folder)
    command.add_argument("--exist-ok", action="store_true", help="reuse {project}/{name} if it exists")


def add_use_commands(commands) -> None:
    """val, predict, export, benchmark: each with its own small set of flags."""
    weights = dict(
        metavar="PATH",
        required=True,
        help="a weights file written by trainer train (.safetensors), or a model trainer export wrote (val, predict)",
    )

    val = commands.add_parser(
        "val",
        help="evaluate trained weights: top-1, top-5, loss, per-class table, confusion matrix",
        description="Evaluate trained weights on the data of their run (or --data). Runs plainly or under "
        "accelerate launch / torchrun; any process count gives the same numbers.",
    )
    val.add_argument("--weights", **weights)
    val.add_argument("--data", help="dataset instead of the run's own (default: from RUN/config.yaml)")
    val.add_argument("--split", choices=("val", "train"), default="val", help="split to evaluate (default: val)")
    val.add_argument("--batch-size", type=positive_int, default=256, help="GLOBAL batch, split over processes")
    val.add_argument("--workers", type=int, default=-1, help="DataLoader workers per process; -1 picks")
    val.add_argument(
        "--loader", choices=LOADERS, default="auto", help="input path, as for train: auto (default), torch, dali"
    )
    val.add_argument("--tta", **TTA_FLAG)
    add_cam(val, "of the top losses: top_losses_cam.png")
    add_run_folder(val, "runs/val")

    predict = commands.add_parser(
        "predict",
        help="classify images: top-k classes with probabilities",
        description="Classify image files, folders and glob patterns; prints a table, writes predictions.csv "
        "(and predictions.json) to a run folder. Unreadable files are listed and skipped.",
    )
    predict.add_argument("--weights", **weights)
    predict.add_argument("sources", nargs="+", metavar="SOURCE", help="image files, folders or quoted globs")
    predict.add_argument("--topk", type=positive_int, default=5, help="classes reported per image (default 5)")
    predict.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass")
    predict.add_argument("--workers", type=int, default=-1, help="DataLoader workers; -1 picks from the CPU count")
    predict.add_argument(
        "--loader", choices=LOADERS, default="auto", help="input path, as for train: auto (default), torch, dali"
    )
    predict.add_argument("--json", action="store_true", help="also write predictions.json")
    predict.add_argument(
        "--threshold", type=float, default=None, help="multi-label weights: list labels above this (default: theirs)"
    )
    predict.add_argument("--tta", **TTA_FLAG)
    add_cam(predict, "of each image's top class: one overlay per image in {run}/cam/")
    add_run_folder(predict, "runs/predict")

    export = commands.add_parser(
        "export",
        help="export trained weights (TorchScript, ONNX, OpenVINO, int8, TensorRT, CoreML, timm hub), verified",
        description="Export trained weights beside them, then check the export through its own runtime on the run's "
        "validation images against PyTorch (top-1 or mAP); an export beyond its bound is not written.",
    )
    export.add_argument("--weights", **weights)
    add_export_flags(export)
    benchmark = commands.add_parser(
        "benchmark",
        help="export every format that runs here, validate and time each: one table",
        description="Export trained weights to each format, validate each on the run's validation images, time "
        "batch-1 latency and batched throughput; print one table and write benchmark.csv to a run folder.",
    )
    benchmark.add_argument("--weights", **weights)
    add_benchmark_flags(benchmark)
    for command in (val, predict, export, benchmark):
        command.add_argument("--debug", action="store_true", help="full tracebacks for input errors")


def add_data_commands(commands) -> None:
    """`trainer data convert SRC DST`: any source --data reads -> WebDataset or Parquet shards; `trainer data audit`:
    label issues, duplicates and outliers from K-fold out-of-sample predictions (trainer.audit)."""
    data = commands.add_parser(
        "data", help="data tools: convert a dataset to shards; audit it for label issues, duplicates, outliers"
    )
    tools = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    convert = tools.add_parser(
        "convert",
        help="write any source --data reads (folder, hub id, Parquet, ...) as WebDataset or Parquet shards",
        description="Convert a dataset once into shards of a chosen size, with its class names and split sizes in "
        "DST/dataset_info.json; then train with --data DST (or --data DST --streaming). DST must be new or empty.",
    )
    convert.add_argument("src", metavar="SRC", help="anything --data accepts: a folder, a hub id, Parquet files, ...")
    convert.add_argument("dst", metavar="DST", help="a new folder for the shards ({split}-000000.tar, ...)")
    convert.add_argument(
        "--format", choices=("webdataset", "parquet"), default="webdataset", help="(default: webdataset)"
    )
    convert.add_argument(
        "--shard-size",
        default="10000",
        help="samples per shard (10000) or image bytes per shard (512MB, 1GB) (default: 10000)",
    )
    convert.add_argument("--data-config", default="", help="configuration (subset) name of a hub dataset")
    convert.add_argument("--allow-download", action="store_true", help="allow reading a hub id from the HF hub")
    convert.add_argument("--debug", action="store_true", help="full tracebacks for input errors")
    audit = tools.add_parser(
        "audit",
        help="find label issues, near duplicates (train/val leaks) and outliers: K-fold training + cleanlab",
        description="Train --folds models with the run's own recipe (train's flags), each holding out one fold of the "
        "training split, so every image gets probabilities from a model that never saw it; then cleanlab finds label "
        "issues, near duplicates within and across train and val, and outliers. Writes label_issues.csv, "
        "duplicates.csv, outliers.csv, summary.txt and image grids to runs/audit/exp. Runs plainly or under "
        "accelerate launch / torchrun; a stopped audit continues with --resume.",
    )
    audit.add_argument("--config", metavar="YAML", help="run config, as for train; flags override it")
    audit.add_argument("--folds", type=positive_int, default=None, help="folds K, each one training (default: 5)")
    audit.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the audit in RUN_DIR (e.g. runs/audit/exp): finished folds are skipped, a half-done one "
        "continues from its checkpoint",
    )
    add_config_flags(audit)
