import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from imcap.errors import ImcapError
from imcap.metrics import CaptionMetrics, java
from imcap.metrics.tokenizer import tokenize
from tests.helpers.coco_reference import as_coco, flickr_sample, make_candidates, requires_flickr

NO_JAVA = ("BLEU", "ROUGE-L", "CIDEr-D")
IDS = [f"img{i}" for i in range(7)]
CANDIDATES = ["A dog runs on the grass.", "Dog", "", "the the the the the", "A man, riding a red bike!",
              "Two people walk on a beach .", "a man riding a red bike"]
REFERENCES = [["A dog runs on grass.", "The dog is running"], ["A dog runs.", "dog"], ["A dog runs."],
              ["The cat sat on the mat.", "A cat."], ["A man rides a red bike down the street.", "A cyclist."],
              ["Two people walking along the beach.", "A couple on the sand.", "People on a beach."],
              ["A man riding a red bike."]]


def coco_scores(candidates, references):
    """pycocoevalcap's scorers on the same (our PTB-tokenised) captions."""
    gts, res = as_coco([tokenize(c) for c in candidates], [[tokenize(r) for r in refs] for refs in references])
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    return {**{f"BLEU-{k + 1}": b for k, b in enumerate(bleu)},
            "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}


def values(metric):
    return {k: float(v) for k, v in metric.compute().items()}


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(java, "_noted", set())


def test_matches_pycocoevalcap_on_edge_cases():
    metric = CaptionMetrics(metrics=NO_JAVA)
    metric.update(IDS, CANDIDATES, REFERENCES)
    assert values(metric) == pytest.approx(coco_scores(CANDIDATES, REFERENCES), abs=1e-9)
    assert list(metric.compute()) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"]


@requires_flickr
@pytest.mark.realdata
def test_matches_pycocoevalcap_on_real_captions():
    _, raw = flickr_sample(500, seed=1)
    candidates, references = make_candidates(raw, seed=1), [refs[1:] for refs in raw]
    metric = CaptionMetrics(metrics=NO_JAVA)
    for start in range(0, len(raw), 64):  # batches, as in validation
        end = start + 64
        metric.update(list(range(start, min(end, len(raw)))), candidates[start:end], references[start:end])
    ours, expected = values(metric), coco_scores(candidates, references)
    assert ours == pytest.approx(expected, abs=1e-4)
    assert 0.1 < ours["BLEU-4"] < ours["BLEU-1"] < 1 and 0.3 < ours["CIDEr-D"] < 3


def ranks_with_padding():
    """Two DDP ranks as Lightning's DistributedSampler fills them: 7 images over 2 ranks of 4,
    the last one padded with image 0 again (it must count once); one rank in two batches."""
    rank0, rank1 = CaptionMetrics(metrics=NO_JAVA), CaptionMetrics(metrics=NO_JAVA)
    order = [0, 2, 4, 6, 1, 3, 5, 0]
    for metric, part in ((rank0, order[:4]), (rank1, order[4:])):
        for batch in (part[:2], part[2:]):
            metric.update([IDS[i] for i in batch], [CANDIDATES[i] for i in batch], [REFERENCES[i] for i in batch])
    return rank0, rank1


def test_merged_ranks_equal_one_process_and_repeated_images_count_once():
    single = CaptionMetrics(metrics=NO_JAVA)
    single.update(IDS, CANDIDATES, REFERENCES)
    rank0, rank1 = ranks_with_padding()
    rank0.merge_state(rank1)
    assert values(rank0) == pytest.approx(values(single), abs=1e-12)
    assert sorted(rank0.corpus().image_ids) == sorted(IDS)
    # counting the padded image twice would change CIDEr-D's idf and every mean
    doubled = CaptionMetrics(metrics=NO_JAVA)
    doubled.update(IDS + ["again"], CANDIDATES + CANDIDATES[:1], REFERENCES + REFERENCES[:1])
    assert values(doubled)["CIDEr-D"] != pytest.approx(values(single)["CIDEr-D"], abs=1e-4)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the idle rank never updated
def test_states_gathered_as_ddp_gathers_them():
    """torchmetrics' own sync path with the all-gather simulated: list states are concatenated
    per rank, gathered, and concatenated again; a rank that saw no batch sends an empty tensor."""
    single = CaptionMetrics(metrics=NO_JAVA)
    single.update(IDS, CANDIDATES, REFERENCES)
    rank0, rank1 = ranks_with_padding()
    idle = CaptionMetrics(metrics=NO_JAVA)
    sent = [torch.cat(rank0.records), torch.cat(rank1.records), None]  # what each rank sends

    def all_gather(rank):
        def gather(tensor, group=None):
            sent[rank] = tensor
            return [tensor if r == rank else sent[r] for r in range(3)]
        return gather

    idle._sync_dist(all_gather(2))
    assert sent[2].dtype == torch.uint8 and sent[2].numel() == 0
    assert values(idle) == pytest.approx(values(single), abs=1e-12)
    rank1._sync_dist(all_gather(1))
    assert isinstance(rank1.records, torch.Tensor) and values(rank1) == pytest.approx(values(single), abs=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_selection_and_unknown_names():
    metric = CaptionMetrics(metrics=["CIDEr-D", "BLEU"])
    metric.update(IDS, CANDIDATES, REFERENCES)
    assert list(metric.compute()) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"]
    with pytest.raises(ImcapError, match="METEOR"):
        CaptionMetrics(metrics=["BLEU", "Meteor"])
    assert CaptionMetrics(metrics=NO_JAVA).compute() == {}  # nothing added yet


def test_a_metric_is_one_registered_class_that_every_list_of_names_offers(monkeypatch):
    from imcap import registry
    from imcap.metrics.coco import metric_keys, metric_names
    from imcap.metrics.corpus import CorpusScore
    from imcap.score import parse_args

    monkeypatch.setitem(registry._registry, "metric", dict(registry.components("metric")))  # undone after

    @registry.register("metric", "test-words")
    class Words(CorpusScore):
        keys = ("words",)

        def score(self, candidates, references):
            return {"words": sum(len(c.split()) for c in candidates), "unavailable": None}

    metric = CaptionMetrics(metrics=["test-words", "CIDEr-D"])
    metric.update(IDS, CANDIDATES, REFERENCES)
    scores = values(metric)
    assert list(scores) == ["CIDEr-D", "words"]  # registration order; a None value is left out
    assert scores["words"] == sum(len(tokenize(c).split()) for c in CANDIDATES)  # on the PTB-tokenised set
    assert metric_names()[-1] == "test-words" and metric_keys()[-1] == "words"
    with pytest.raises(ImcapError, match="CIDEr-D, SPICE, BLEU_nltk, test-words"):
        CaptionMetrics(metrics=["Words"])
    assert parse_args(["--references", "r", "--predictions", "p", "--metrics", "test-words"]).metrics == ["test-words"]


def test_bad_updates_are_rejected():
    metric = CaptionMetrics(metrics=NO_JAVA)
    with pytest.raises(ValueError, match="must match"):
        metric.update(IDS[:2], CANDIDATES[:3], REFERENCES[:3])
    with pytest.raises(ValueError, match="non-empty"):
        metric.update(IDS[:1], CANDIDATES[:1], [[]])
    with pytest.raises(ValueError, match="caption string"):
        metric.update(IDS[:1], [None], REFERENCES[:1])
    with pytest.raises(TypeError, match="ints or strings"):
        metric.update([1.5], CANDIDATES[:1], REFERENCES[:1])
    metric.update(torch.tensor([3, 4]), CANDIDATES[:2], REFERENCES[:2])  # tensor ids are ints
    assert metric.corpus().image_ids == [3, 4]
