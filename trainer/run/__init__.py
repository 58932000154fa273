"""What keeps a run safe and resumable: its folder, its checkpoints, and one line for every fault.

    layout (file names) -> rundirs (folders + lock) -> checkpointer (save / restore) -> resume (find + rebuild config)

- `layout`: the names of a run's files and folders; `rundirs`: `{project}/{name}`, numbered, one writer each;
- `checkpointer`: `TrainState`, `Checkpointer` (save, rotate, restore), `Stopped`; `manifest`: a checkpoint is
  complete or unused, its state checked against the run, the data fingerprint compared on `--resume`;
- `safeload`: pickle files read as plain data before anything loads them; `weights`: weight files and their
  metadata; `finite`: nothing non-finite is saved; `writes`: outputs written then renamed, disk errors as one line;
- `resume`: `--resume [RUN_DIR|auto]`, the run found and its config rebuilt (before torch loads);
- `peers` (a lost rank) and `faults` (environment errors): one line for the user, exit 2.

Light: this package's `__init__` imports nothing, so `layout`, `rundirs` and `resume` load without torch or the data
package (the CLI reads them first; tests/unit/test_imports.py checks it).
"""
