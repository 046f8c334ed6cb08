"""Caption metrics as torchmetrics-style classes (accumulate over batches, DDP-synced).

`CaptionMetrics` computes the registered metrics it is given by name (imcap.metrics.coco: the
official COCO set BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, and BLEU_nltk) with coco-caption's
PTB tokenisation; a metric of one's own is one `CorpusScore` class registered with
`@register("metric", name)`. The single metrics are there for when one is enough.

The classes load on first access, so that `imcap.metrics.tokenizer` and `imcap.metrics.java`
import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CaptionCorpusMetric": "imcap.metrics.corpus",
    "CaptionMetrics": "imcap.metrics.coco",
    "CorpusScore": "imcap.metrics.corpus",
    "CiderD": "imcap.metrics.cider",
    "CorpusBLEU": "imcap.metrics.bleu",
    "Meteor": "imcap.metrics.meteor",
    "RougeL": "imcap.metrics.rouge",
    "Spice": "imcap.metrics.spice",
}
__all__ = ["CaptionCorpusMetric", "CaptionMetrics", "CiderD", "CorpusScore", "CorpusBLEU", "Meteor", "RougeL", "Spice"]

if TYPE_CHECKING:
    from imcap.metrics.bleu import CorpusBLEU
    from imcap.metrics.cider import CiderD
    from imcap.metrics.coco import CaptionMetrics
    from imcap.metrics.corpus import CaptionCorpusMetric, CorpusScore
    from imcap.metrics.meteor import Meteor
    from imcap.metrics.rouge import RougeL
    from imcap.metrics.spice import Spice


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'imcap.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
