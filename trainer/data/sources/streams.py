"""Streams (--streaming): which stream `--data` names (`stream_source`: Parquet/WebDataset shards found and checked
as the map-style loaders find and check them, or a hub id) and its size without reading it. A stream's training split
is a `datasets.IterableDataset`, never materialised, its columns standardised as every source's
(`standard.standard_stream`); its validation split is read once into the datasets cache (`read_split`) and served as
map-style data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config import DataConfig, UserError
from trainer.data.sources.builtin import BUILTIN
from trainer.data.sources.datafiles import DataFiles, data_files
from trainer.data.sources.hub import hub_description
from trainer.data.sources.shardcheck import check_shards, parquet_rows, tar_samples
from trainer.data.sources.standard import standard_stream


@dataclass(frozen=True)
class StreamSource:
    """What --streaming reads: a hub id, or Parquet/WebDataset files; `open(split)` gives a `datasets.IterableDataset`
    (nothing materialised), `counts` the split sizes known without reading the data."""

    builder: str  # a packaged module (parquet, webdataset) or a hub id
    config_name: str | None
    files: DataFiles | None
    split_names: tuple[str, ...]
    counts: dict  # split -> number of examples, where the metadata says
    features: object  # datasets.Features or None (then: as the stream reports them)
    description: str

    def open(self, split: str):
        import datasets

        return datasets.load_dataset(
            self.builder,
            self.config_name,
            data_files=self.files.by_split if self.files else None,
            features=self.features,
            split=split,
            streaming=True,
        )

    def count(self, split: str) -> int | None:
        """The split's size: from the metadata, Parquet footers or tar headers (local files); None if unknown."""
        if split in self.counts:
            return self.counts[split]
        if self.files is None:
            return None
        files = self.files.by_split[split]
        if self.files.builder == "parquet":
            return sum(parquet_rows(f) for f in files)
        if self.files.builder == "webdataset":
            return sum(tar_samples(f) for f in files)  # a shard cut short: refused here, naming it
        return None


def stream_source(cfg: DataConfig) -> StreamSource:
    """Which stream --data --streaming names; refuses what cannot stream (built-ins, image and save_to_disk folders)."""
    import datasets

    spec = cfg.data
    files = None if spec in BUILTIN else data_files(spec)
    if files is not None:
        if files.builder not in ("parquet", "webdataset"):
            raise UserError(f"--data {spec}: --streaming reads Parquet or WebDataset shards, not {files.builder} files")
        check_shards(files.builder, files.by_split)  # cut short: one line naming it now, not a crash mid-epoch
        stored = files.info()
        counts = {name: s.num_examples for name, s in (stored.splits or {}).items()} if stored else {}
        return StreamSource(
            files.builder,
            None,
            files,
            tuple(files.by_split),
            counts,
            stored.features if stored else None,
            f"stream:{files.builder}:{spec}",
        )
    if spec in BUILTIN or Path(spec).expanduser().exists():
        raise UserError(
            f"--data {spec}: --streaming reads a hub id or Parquet/WebDataset shards; convert this data once with "
            f"`trainer data convert {spec} SHARDS_DIR`, then stream SHARDS_DIR (or drop --streaming)"
        )
    try:
        builder = datasets.load_dataset_builder(spec, cfg.data_config or None)
    except Exception as e:  # offline, unknown id, bad config: all mean this id cannot stream from here
        reason = f"{type(e).__name__}: {e}".split("\n")[0]
        raise UserError(
            f"--data {spec}: cannot open for streaming ({reason}); hub ids stream with --allow-download"
        ) from e
    splits = builder.info.splits or {}
    return StreamSource(
        spec,
        cfg.data_config or None,
        None,
        tuple(splits) or ("train",),
        {name: s.num_examples for name, s in splits.items() if s.num_examples},
        None,
        f"stream:{hub_description(spec, cfg.data_config)}",
    )


def read_split(source: StreamSource, split: str, image_col: str, label_col: str, names: list[str]):
    """The streamed split, written once into the datasets cache; keyed on the files' sizes and times (local data)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)})
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.Dataset.from_generator(
            _split_rows,
            features=features,
            gen_kwargs={
                "source": source,
                "split": split,
                "columns": (image_col, label_col),
                # A string, not a list: from_generator would read a list as shards and call _split_rows per item.
                "stamp": repr(source.files.stamp() if source.files else []),
            },
        )
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _split_rows(source: StreamSource, split: str, columns: tuple[str, str], stamp: str):
    yield from standard_stream(source.open(split), *columns)
