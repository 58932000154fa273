"""Training: a run's set-up steps, the loop, and what shapes a step. Imports run down this list.

    launch -> engine (set-up: data, model, loaders, optimisation, run folder) -> loop (fit = train_one_epoch + evaluate)

- `launch`: one Accelerator as launched, and the launches refused before anything loads;
- `engine`: `train()`, the steps of a run's set-up, each one function; hands a `Loop` to `loop.fit`;
- `loop`: `Loop`, `fit`, `train_one_epoch`, `evaluate`; every collective marked where it is called;
- what a step is made of: `model` (timm model, the SyncBN decision, FSDP blocks), `optim` (optimizer, schedule, EMA),
  `tasks` (single- or multi-label: loss, scoring, the best metric), `distill` (a frozen teacher's term),
  `finetune` (--freeze / --unfreeze-epoch), `stopping` (--patience), `autobatch` (--batch-size auto);
- `lr_find`: `trainer lr-find`, a short training run of the run's own set-up (here, not in use/, because it trains).

Training reads and writes through run/ (checkpoints, weights, run folders) and report/ (every main-process output).
"""
