"""The source step: where images come from. Each kind of `--data` has its own loader, and one function picks it:

    load_source: --data -> one kind's loader -> standard.standardize -> Source (`image`, `label`, class names)

- `builtin`: built-in sets (mnist, digits) from installed wheels;
- `saved`: `save_to_disk` folders;
- `datafiles`: Parquet/Arrow files and WebDataset .tar shards (a file, a folder, a glob or a brace pattern), checked
  whole by `shardcheck` before they are read;
- `labels_csv`: image folders with a labels.csv (multi-label);
- `classfolder`: class folders, every file checked up front (`imagecheck`) and the scan cached (`scancache`);
- `hub`: HF hub ids;
- `standard`: what every loaded source becomes (columns `image` and `label`, class names), and the split names;
- `streams` (--streaming): Parquet/WebDataset shards or hub ids, read as they train, from the same pieces
  (`datafiles`, `shardcheck`, `hub`, `standard`).

Built-ins and class folders come out of their loaders already standard; the others pass through `standardize`.
Bad input is refused here, before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import DataConfig, UserError
from trainer.data.sources.builtin import BUILTIN, load_builtin
from trainer.data.sources.classfolder import load_class_folder
from trainer.data.sources.datafiles import INFO_FILE, DataFiles, data_files, load_files
from trainer.data.sources.hub import load_hub
from trainer.data.sources.labels_csv import labels_csv_splits, load_labels_csv
from trainer.data.sources.saved import is_saved, load_saved
from trainer.data.sources.standard import Source, check_task, detect_columns, split_names, standard_stream, standardize
from trainer.data.sources.streams import StreamSource, read_split, stream_source


def load_source(cfg: DataConfig) -> Source:
    """Load what `--data` names: a built-in name, a folder or file path, or a HF hub dataset id.

    Called through `splits.load_splits_in_turn`: the main process fills the HF datasets cache, the others reuse it.
    """
    spec = cfg.data
    if spec in BUILTIN:
        return load_builtin(spec)
    path = Path(spec).expanduser()
    if is_saved(path):
        return standardize(load_saved(path, spec), cfg)
    files = data_files(spec)
    if files is not None:
        return standardize(load_files(files, spec), cfg)
    if path.is_dir() and labels_csv_splits(path):
        return standardize(load_labels_csv(path, cfg.label_delimiter, spec), cfg)
    if path.exists():
        return load_class_folder(path, spec)
    if spec.startswith((".", "/", "~")) or spec.endswith((".parquet", ".arrow", ".tar")) or spec.count("/") > 1:
        raise UserError(
            f"--data {spec}: no such file or folder; give an image folder, a save_to_disk folder, Parquet/Arrow "
            f"files, a hub id or a built-in name ({', '.join(BUILTIN)})"
        )
    return standardize(load_hub(spec, cfg.data_config), cfg)


__all__ = [
    "BUILTIN",
    "INFO_FILE",
    "DataFiles",
    "Source",
    "StreamSource",
    "check_task",
    "data_files",
    "detect_columns",
    "load_source",
    "read_split",
    "split_names",
    "standard_stream",
    "standardize",
    "stream_source",
]
