"""What people look at: the terminal, the run folder's reports and plots, the metrics and the trackers.

    metrics (numbers of gathered predictions) -> evaluation (tables, plots) -> reporter (console, files, trackers)

- `metrics`: top-k, macro-F1, balanced accuracy, calibration, mAP (scikit-learn), on gathered predictions;
- `evaluation`: per-class tables, confusion matrix, prediction grids, results/reliability/PR plots (pure functions);
- `progress`: the progress bar on a terminal, plain periodic lines elsewhere;
- `trackers`: wandb and TensorBoard through accelerate's tracking API (start, resume, the end-of-run media);
- `reporter`: `Reporter`, the one place with main-process-only side effects (console, config.yaml, results.csv,
  plots, trackers); every rank may call it, only the main process acts.
"""
