"""Load an image folder's splits on every rank as `trainer train` does, and write what each rank got.

Run under torchrun; each rank writes OUT_DIR/rank<N>.json: the world size, how many files this rank opened to check
them, and its train/val file lists with labels and the skipped files.
Usage: python folder_ranks.py FOLDER OUT_DIR
"""

import json
import sys
from pathlib import Path

from trainer import data
from trainer.config import build_config
from trainer.data.sources import classfolder
from trainer.train.launch import build_accelerator


def main(folder: str, out_dir: str) -> None:
    cfg = build_config({"run": {"tracker": "none"}, "data": {"data": folder}})
    accelerator = build_accelerator(cfg)
    opened = []
    check_files = classfolder._check_files
    classfolder._check_files = lambda files: opened.extend(files) or check_files(files)
    with accelerator.main_process_first():  # as engine.train: the main process scans, the others reuse its scan
        splits, info = data.load_splits(cfg.data)
    record = {
        "world_size": accelerator.num_processes,
        "opened": len(opened),
        "skipped": [list(s) for s in info.skipped],
        **{f"{name}_files": [r["image"]["path"] for r in split] for name, split in splits.items()},
        **{f"{name}_labels": list(split["label"]) for name, split in splits.items()},
        "cache_files": [f["filename"] for f in splits["train"].cache_files],
    }
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
