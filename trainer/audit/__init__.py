"""What inspects the data: `trainer data audit`, out-of-sample predictions of every image and what they say is wrong.

    folds (K sub-runs of the run's own recipe) -> outputs (probabilities + embeddings) -> issues (cleanlab) -> findings

- `folds`: the training split cut into K stratified folds; fold k trains on the other K-1 with the run's own set-up
  (`train.engine.train`, its held-out fold as validation) in `{audit}/folds/fold{k}`, a run folder like any other:
  a finished fold is skipped, a half-done one resumes from its checkpoint (--resume machinery), so a killed audit
  continues where it stopped; then the fold model's softmax and `forward_head(pre_logits=True)` embeddings of every
  training and validation image, gathered in dataset order (`outputs.npz`, written once the fold is done);
- `issues`: the folds put together (each training image's probabilities from the one model that never saw it, each
  validation image's averaged over the K models, embeddings of all K concatenated) and cleanlab's `Datalab` run on
  them: label issues, near duplicates within and across train and val (leaks), outliers, class imbalance;
- `findings`: label_issues.csv, duplicates.csv, outliers.csv, summary.txt/.json, an image grid per issue type, and
  wandb tables when a tracker is on (through report.Reporter, main process only);
- `command`: `audit()`, the flow above, every rank running it as it runs a training.

Imports run down: audit -> train, use -> run, report -> data -> config. The class-activation heatmaps of val and
predict (`--cam`) are drawn by report.heatmaps, below use/, which draws them.
"""
