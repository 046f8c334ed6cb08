"""Caption metrics as torchmetrics-style classes (accumulate over batches, DDP-synced)."""

from imcap.metrics.bleu import CorpusBLEU

__all__ = ["CorpusBLEU"]
