"""The base of the metrics that need the whole evaluated set at once (CIDEr-D's document
frequencies, METEOR's corpus statistics): their state is the captions themselves.

Each `update` appends the batch's (image id, candidate, references) as UTF-8 JSON records, each
ended by 0xFF (a byte UTF-8 never contains), in one uint8 tensor. A list state reduced by "cat"
gathers those tensors across DDP ranks; `compute` splits them again and keeps the first record
of each image id, because Lightning's DistributedSampler pads the last batches with repeated
images and a repeated image must not count twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from imcap.metrics.tokenizer import tokenize as ptb_tokenize

ImageId = int | str
_END = b"\xff"


class Corpus(NamedTuple):
    """The evaluated set, one entry per distinct image id, in the order first seen."""

    image_ids: list[ImageId]
    candidates: list[str]
    references: list[list[str]]


def _plain_id(image_id: Any) -> ImageId:
    """Image ids as JSON can carry them: ints (also from tensors or numpy) or strings."""
    if isinstance(image_id, torch.Tensor):
        image_id = image_id.item()
    if isinstance(image_id, str):
        return image_id
    if isinstance(image_id, bool) or not hasattr(image_id, "__index__"):
        raise TypeError(f"image ids must be ints or strings, got {image_id!r}")
    return int(image_id)


class CorpusScore:
    """A caption metric as the registry holds it (`@register("metric", name)`): `score()` maps the
    evaluated set (PTB-tokenised, one caption per distinct image, gathered across DDP ranks by
    `CaptionMetrics`) to {key: value}, each logged as val/<key> or test/<key>. A value of None
    leaves its key out (a metric that cannot run on this machine says so itself).

    `coco_caption` marks the metrics of coco-caption's COCOEvalCap: what `imcap.score` reports
    unless told otherwise. Keyword options reach `__init__` from `CaptionMetrics`."""

    coco_caption = False
    keys: tuple[str, ...] = ()  # the keys `score` returns (W&B's best-value summaries name them)

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float | None]:
        raise NotImplementedError


class CaptionCorpusMetric(Metric):
    """`update(image_ids, candidates, references)` with raw captions (PTB-tokenised here as
    coco-caption does, unless `tokenize=False` for text that already is); `compute()` returns
    {name: score} from `score()` over the deduplicated evaluated set."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, tokenize: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenize = tokenize
        self.add_state("records", default=[], dist_reduce_fx="cat")  # 1-D uint8 tensors, one per update

    def update(self, image_ids: Sequence[Any] | torch.Tensor, candidates: Sequence[str],
               references: Sequence[Sequence[str]]) -> None:
        ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
        if not len(ids) == len(candidates) == len(references):
            raise ValueError(f"{len(ids)} image ids, {len(candidates)} candidates and "
                             f"{len(references)} reference lists: they must match")
        prepare: Callable[[str], str] = ptb_tokenize if self.tokenize else (lambda s: s)
        chunks = []
        for image_id, candidate, refs in zip(ids, candidates, references):
            if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in [candidate, *refs]):
                raise ValueError(f"image {image_id!r}: expected a caption string and a non-empty "
                                 f"list of reference strings")
            record = [_plain_id(image_id), prepare(candidate), [prepare(r) for r in refs]]
            chunks.append(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass") + _END)
        if chunks:
            data = bytearray(b"".join(chunks))
            self.records.append(torch.frombuffer(data, dtype=torch.uint8).to(self.device))

    def corpus(self) -> Corpus:
        """The captions gathered so far (across ranks once synced), without repeated images."""
        state = self.records
        if isinstance(state, list):
            state = torch.cat(state) if state else torch.zeros(0, dtype=torch.uint8)
        data = state.to(torch.uint8).cpu().numpy().tobytes()
        seen: dict[ImageId, tuple[str, list[str]]] = {}
        for chunk in data.split(_END)[:-1]:
            image_id, candidate, refs = json.loads(chunk.decode("utf-8", "surrogatepass"))
            seen.setdefault(image_id, (candidate, refs))
        return Corpus(list(seen), [c for c, _ in seen.values()], [r for _, r in seen.values()])

    def score(self, candidates: list[str], references: list[list[str]]) -> dict[str, float]:
        raise NotImplementedError

    def compute(self) -> dict[str, torch.Tensor]:
        corpus = self.corpus()
        if not corpus.image_ids:
            return {}
        scores = self.score(corpus.candidates, corpus.references)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None) -> None:
        # torchmetrics stands in an empty *float* tensor for a rank that saw no batch; gathering
        # it with the other ranks' uint8 tensors would mix dtypes, so send an empty uint8 one.
        if isinstance(self.records, list) and not self.records:
            self.records = [torch.zeros(0, dtype=torch.uint8, device=self.device)]
        super()._sync_dist(dist_sync_fn, process_group)
