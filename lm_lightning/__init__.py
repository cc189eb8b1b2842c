"""lm_lightning: a PyTorch Lightning template for training language models when memory is the constraint."""

__version__ = "0.1.0"
