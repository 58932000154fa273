"""trainer: image classification on Accelerate, timm, HF datasets and wandb."""

__version__ = "0.1.0"
