"""trainer: image classification on Accelerate, timm, HF datasets and wandb.

One sub-package per job; imports run one way, entry -> audit -> train/use -> run/report -> data -> config
(tests/unit/test_imports.py fails on a circle):

    __main__, cli   argv/YAML -> Config -> a command; flags: the flags made from the config dataclasses
    config          the config dataclasses, one per component, checked on construction
    train/          a run's set-up steps and the loop; what shapes a step (model, optimizer, task, teacher, freeze)
    use/            what runs a trained model: inference, val, predict, export formats, benchmark, TTA
    audit/          what inspects the data: trainer data audit (K-fold out-of-sample predictions + cleanlab)
    run/            what keeps a run safe: run folders + lock, checkpoints, resume, manifests, weights, faults
    report/         what people look at: terminal, run-folder reports and plots, metrics, mistakes, heatmaps, trackers
    data/           one pipeline: source -> splits -> samples -> decode -> backend -> loader -> rank shard

config, run.layout, run.rundirs and run.resume load without torch or the data package: the CLI reads them first.
"""

__version__ = "0.1.0"
