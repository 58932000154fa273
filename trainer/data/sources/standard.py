"""What every source becomes, after its kind's loader: splits with two columns, `image` (stored, not decoded:
`data.decode` decodes) and `label` (a ClassLabel, or a multi-hot row: data/multilabel.py), their class names
(`standardize`; a stream's columns: `standard_stream`), which columns hold the images and labels (`detect_columns`),
and which splits train and validate (`split_names`), for map-style sources and streams alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.config import DataConfig, UserError
from trainer.data.multilabel import is_list_feature, json_labels, list_class_names, multi_hot, natural_key

# WebDataset shards name their columns by file extension: `jpg`/`png`/... for the image, `cls` for the label.
IMAGE_COLUMNS = ("image", "img", "pixel_values", "jpg", "jpeg", "png", "webp")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "cls")
# Split names as written on disk or on the hub, and the order in which one is picked for validation.
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("validation", "val", "valid", "test")


def split_names(names: list[str], cfg: DataConfig) -> tuple[str, str]:
    """(training split, validation split or "") among `names`: the flags', else the first known name (the first
    split for training). The one place split names are chosen, for every source and streams."""
    train = cfg.train_split or next((n for n in TRAIN_SPLITS if n in names), names[0])
    val = cfg.val_split or next((n for n in VAL_SPLITS if n in names and n != train), "")
    for flag, name in (("--train-split", train), ("--val-split", val)):
        if name and name not in names:
            raise UserError(f"--data {cfg.data}: {flag} {name!r} is not a split; splits: {', '.join(names)}")
    return train, val


@dataclass(frozen=True)
class Source:
    """A loaded dataset: named splits (columns `image`, `label` once standard), class names, and what happened on the
    way."""

    splits: dict  # split name -> datasets.Dataset
    class_names: list[str]
    description: str
    channels: int | None = None  # 1 or 3 when the loader knows; None: look at a few images
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of unreadable files left out
    default_hflip: float = 0.5
    multilabel: bool = False  # `label` holds a multi-hot row per image (data/multilabel.py)
    notes: tuple[str, ...] = ()  # warnings for the run's header: legitimate, but likely not what was meant


def detect_columns(features, image_column: str, label_column: str, where: str) -> tuple[str, str]:
    """The image and label columns: the flags', a known name, or the only Image / ClassLabel feature."""
    import datasets

    columns = list(features)

    def pick(given: str, names: tuple[str, ...], kind, flag: str, what: str) -> str:
        if given:
            if given not in features:
                raise UserError(f"--data {where}: {flag} {given!r} is not a column; columns: {', '.join(columns)}")
            return given
        found = [c for c in names if c in features] or [c for c, f in features.items() if kind(f)]
        if len(found) != 1 and not (found and found[0] in names):
            raise UserError(
                f"--data {where}: cannot tell which column holds the {what} (columns: {', '.join(columns)}); "
                f"name it with {flag}"
            )
        return found[0]

    def is_label(f) -> bool:  # a ClassLabel, or a list of them (multi-label)
        return isinstance(f, datasets.ClassLabel) or isinstance(getattr(f, "feature", None), datasets.ClassLabel)

    image = pick(image_column, IMAGE_COLUMNS, lambda f: isinstance(f, datasets.Image), "--image-column", "images")
    label = pick(label_column, LABEL_COLUMNS, is_label, "--label-column", "labels")
    return image, label


def standardize(source: Source, cfg: DataConfig) -> Source:
    """Rename the detected columns to `image`/`label`, keep images undecoded, and make the label a ClassLabel."""
    import datasets

    if not source.splits:
        raise UserError(f"--data {cfg.data}: no splits found")
    source = dataclasses.replace(source, splits=json_labels(source.splits, LABEL_COLUMNS))
    first = next(iter(source.splits.values()))
    image_col, label_col = detect_columns(first.features, cfg.image_column, cfg.label_column, cfg.data)
    label_feature = first.features[label_col]
    multilabel = is_list_feature(label_feature)
    if multilabel:
        splits = source.splits
        train_name = cfg.train_split or next((n for n in TRAIN_SPLITS if n in splits), next(iter(splits)))
        train_values = splits[train_name].with_format("arrow")[label_col].to_pylist() if train_name in splits else []
        names = list_class_names(label_feature, train_values)
    elif isinstance(label_feature, datasets.ClassLabel):
        names = list(label_feature.names)
    else:
        values = {name: split[label_col] for name, split in source.splits.items()}
        train_name = cfg.train_split or next((n for n in TRAIN_SPLITS if n in values), next(iter(values)))
        # Class names come from the training split: a label seen only elsewhere is an error, caught below.
        names = sorted({str(v) for v in values.get(train_name, [])}, key=natural_key)
    splits = {}
    for name, split in source.splits.items():
        if name in (cfg.train_split, cfg.val_split) or name in TRAIN_SPLITS + VAL_SPLITS or len(source.splits) == 1:
            splits[name] = _standard_split(split, image_col, label_col, names, cfg.data, name, multilabel)
    return dataclasses.replace(source, splits=splits, class_names=names, multilabel=multilabel)


def check_task(cfg: DataConfig, multilabel: bool) -> None:
    """--task against what the labels are (lists, or one label per image)."""
    if multilabel and cfg.task == "multiclass":
        raise UserError(
            f"--data {cfg.data}: --task multiclass, but its labels are lists (multi-label); use --task multilabel "
            "(or auto)"
        )
    if not multilabel and cfg.task == "multilabel":
        raise UserError(
            f"--data {cfg.data}: --task multilabel, but it has one label per image; give lists of labels (or an "
            "image folder with a labels.csv), or drop --task"
        )


def _standard_split(
    split, image_col: str, label_col: str, names: list[str], where: str, split_name: str, multilabel: bool = False
):
    import datasets

    split = split.select_columns([image_col, label_col])
    if not isinstance(split.features[image_col], datasets.Sequence | datasets.Array3D | datasets.Array2D):
        # Keep images as stored (bytes or path): decoding belongs to ImageTransform, the single decode seam.
        split = split.cast_column(image_col, datasets.Image(decode=False))
    if image_col != "image":
        split = split.rename_column(image_col, "image")
    if multilabel:
        split = multi_hot(split, label_col, names, where, split_name)
    elif not isinstance(split.features[label_col], datasets.ClassLabel):
        index = {n: i for i, n in enumerate(names)}
        values = [str(v) for v in split[label_col]]
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise UserError(
                f"--data {where}: split {split_name!r} has label(s) {', '.join(unknown[:5])} that training lacks; "
                "every class needs training images"
            )
        split = split.remove_columns(label_col).add_column(
            "label", [index[v] for v in values], feature=datasets.ClassLabel(names=names)
        )
    elif label_col != "label":
        split = split.rename_column(label_col, "label")
    return split


def standard_stream(stream, image_col: str, label_col: str):
    """A stream's columns `image` (undecoded: decoding belongs to ImageTransform) and `label`, as every other source
    has."""
    import datasets

    stream = stream.select_columns([image_col, label_col]).cast_column(image_col, datasets.Image(decode=False))
    if image_col != "image":
        stream = stream.rename_column(image_col, "image")
    return stream.rename_column(label_col, "label") if label_col != "label" else stream
