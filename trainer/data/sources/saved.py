"""`save_to_disk` folders (a `DatasetDict` or one `Dataset`): read back with `datasets.load_from_disk`."""

from __future__ import annotations

from pathlib import Path

from trainer.config import UserError
from trainer.data.sources.standard import Source


def is_saved(path: Path) -> bool:
    """Whether `path` is a folder that `save_to_disk` wrote (a DatasetDict's or a Dataset's)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_saved(path: Path, spec: str) -> Source:
    """A save_to_disk folder's splits as they are (one Dataset: the `train` split); standardised after."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged folder
        reason = f"{type(e).__name__}: {e}".split("\n")[0]
        raise UserError(f"--data {spec}: not a readable save_to_disk folder ({reason})") from e
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return Source(splits, [], f"saved:{spec}")
