"""trainer: image classification on Accelerate, timm, HF datasets and wandb.

Imports run one way, cli -> engine -> loop -> components (tests/unit/test_imports.py fails on a circle):

    cli           argv/YAML -> Config; the subcommands
    config        the config dataclasses, checked on construction
    resume        --resume: find the run, rebuild and check its config
    launch        one Accelerator as launched, and the launches refused
    engine        train(): the set-up steps of a run
    loop          Loop; fit(), train_one_epoch(), evaluate()
    data          one pipeline: source -> splits -> samples -> decode -> backend -> loader -> rank shard
    model         the timm model, the SyncBN decision, FSDP blocks
    optim         optimizer, schedule, weight EMA
    tracking      Reporter: every main-process-only output (console, config.yaml, results.csv, trackers)
    report        per-class tables, confusion matrix, plots
    checkpointer  TrainState, Checkpointer (save, rotate, restore), Stopped
    safeload      checkpoint files read as plain data before they are loaded
    weights       weight files, their metadata and file mode
    rundirs       run folders: exp, exp2, ...
    files         the names of a run's files and folders
    inference     a weights file -> its model and preprocessing (val, predict, export)
    evaluate, predict, export   the `val`, `predict` and `export` commands

files, rundirs, resume and config load without torch or the data package: the CLI reads them first.
"""

__version__ = "0.1.0"
