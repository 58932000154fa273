"""Claim a run folder on every rank as `trainer train` does (create_run_dir), and write what each rank decided.

Run under torchrun; each rank writes OUT_DIR/rank<N>.json: the world size and the folder it got or the refusal.
Usage: python lock_ranks.py PROJECT NAME OUT_DIR
"""

import json
import sys
from pathlib import Path

from trainer.config import UserError, build_config
from trainer.run.rundirs import RunFolder, create_run_dir
from trainer.train.launch import build_accelerator


def main(project: str, name: str, out_dir: str) -> None:
    accelerator = build_accelerator(build_config({"run": {"tracker": "none"}}))
    try:
        decision = {"run_dir": str(create_run_dir(accelerator, RunFolder(project, name, exist_ok=True)))}
    except UserError as e:
        decision = {"refused": str(e)}
    record = {"world_size": accelerator.num_processes, **decision}
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()  # Collective: every rank, decided alike or not, meets here before leaving
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
