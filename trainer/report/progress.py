"""The main process's progress display: a bar on a terminal, plain periodic lines anywhere else."""

from __future__ import annotations

import sys
import time

PLAIN_PROGRESS_SECONDS = 30.0  # without a terminal, one progress line this often instead of a redrawn bar


class Progress:
    """A tqdm bar on a terminal; elsewhere (CI, log files) a plain line every PLAIN_PROGRESS_SECONDS."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self.start = self.last_line = time.monotonic()
        self.postfix: dict[str, str] = {}
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stdout, leave=False, dynamic_ncols=True, unit="batch")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self.last_line = now = time.monotonic()
            eta = (now - self.start) / self.done * (self.total - self.done)
            fields = "  ".join(f"{k} {v}" for k, v in self.postfix.items())
            print(f"  {self.desc}  {self.done}/{self.total}  {fields}  eta {eta:.0f}s", flush=True)

    def set_postfix(self, **values: str) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
