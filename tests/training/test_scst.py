from functools import partial

import pytest
import torch

from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.attention import AdditiveAttention
from imcap.models.embeddings import LearnedEmbedding
from imcap.models.lstm import LSTMDecoder
from imcap.models.search import Decoding
from imcap.training.scst import SCST, scst_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a shared CPU

VOCAB = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "red", "blue", "circle", "square"])


def decoder() -> LSTMDecoder:
    torch.manual_seed(0)
    emb = LearnedEmbedding(VOCAB.itos, dim=16)
    return LSTMDecoder(len(VOCAB), 12, emb, partial(AdditiveAttention, attention_dim=8), hidden_dim=24, dropout=0.0)


def blue_reward(candidates, references):
    """Share of words that are 'blue': a reward the policy can learn to maximise."""
    return torch.tensor([c.split().count("blue") / max(1, len(c.split())) for c in candidates])


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_policy_gradient_raises_the_reward(baseline):
    dec = decoder()
    grid = torch.randn(8, 4, 12)
    refs = [["a reference"]] * 8
    config = SCST(start_epoch=0, baseline=baseline, num_samples=4, max_length=6)
    optimizer = torch.optim.Adam(dec.parameters(), lr=1e-2)
    rewards = []
    for _ in range(40):
        out = scst_loss(dec, grid, grid.mean(1), refs, VOCAB, blue_reward, config)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        rewards.append(float(out["reward"]))
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.3


def test_baseline_carries_no_gradient_and_equal_rewards_give_zero_loss():
    dec = decoder()
    grid = torch.randn(3, 4, 12)
    out = scst_loss(dec, grid, grid.mean(1), [["x"]] * 3, VOCAB, lambda c, r: torch.ones(len(c)),
                    SCST(start_epoch=0, baseline="mean", num_samples=3))
    assert float(out["loss"]) == 0.0 and float(out["baseline"]) == 1.0


def test_scst_options_are_checked():
    assert not SCST().active(100) and SCST(start_epoch=3).active(3) and not SCST(start_epoch=3).active(2)
    with pytest.raises(ImcapError, match="baseline"):
        SCST(baseline="median")
    with pytest.raises(ImcapError, match="num_samples"):
        SCST(baseline="mean", num_samples=1)
    with pytest.raises(ImcapError, match="temperature"):  # 0 would be greedy: every sample the same
        SCST(temperature=0.0)
    with pytest.raises(ImcapError, match="model.scst.lr"):
        SCST(lr=0.0)


def test_scst_samples_and_baseline_obey_the_decoding_rules():
    """No <unk> and no caption ending on "a", neither sampled nor in the greedy baseline, even
    from a model that prefers both; with the rules off the same model writes them."""
    vocab = Vocabulary([*VOCAB.itos, "a"])
    torch.manual_seed(0)
    dec = LSTMDecoder(len(vocab), 12, LearnedEmbedding(vocab.itos, dim=16),
                      partial(AdditiveAttention, attention_dim=8), hidden_dim=24, dropout=0.0)
    with torch.no_grad():
        dec.output.bias[vocab.unk_id] += 8.0
        dec.output.bias[vocab.stoi["a"]] += 6.0
    grid = torch.randn(4, 4, 12)
    config = SCST(start_epoch=0, baseline="greedy", num_samples=5, max_length=6)

    def written(decoding: Decoding) -> list[list[str]]:
        seen: list[str] = []
        def reward(candidates, references):
            seen.extend(candidates)
            return torch.zeros(len(candidates))
        scst_loss(dec, grid, grid.mean(1), [["a red circle"]] * 4, vocab, reward, config, decoding)
        return [c.split() for c in seen]  # 20 samples, then 4 greedy captions

    ruled = written(Decoding())
    assert len(ruled) == 24 and all(words and "<unk>" not in words and words[-1] != "a" for words in ruled)
    assert sum("<unk>" in words for words in written(Decoding(allow_unk=True))) > 12
    assert sum(words[-1:] == ["a"] for words in written(Decoding(bad_endings=[]))) > 6


def test_an_scst_epoch_visits_each_image_once_and_is_validated(tmp_path):
    # 48 images x 5 captions in batches of 16: 15 cross-entropy steps, then 3 SCST steps (one
    # caption per image: the reward already uses all five references), and SCST is validated
    import csv

    from tests.helpers.runs import TINY, module

    result = module("train", *TINY, "trainer.max_epochs=2", "model.scst.start_epoch=1", "data.captions_per_image=null",
                    "test=false", "trainer.log_every_n_steps=1", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(next((tmp_path / "run" / "csv").rglob("metrics.csv")), encoding="utf-8")))
    steps = {e: max(int(r["step"]) for r in rows if r["epoch"] == str(e) and r.get("train/loss")) for e in (0, 1)}
    assert steps == {0: 14, 1: 17}
    assert [r["epoch"] for r in rows if r.get("val/CIDEr-D")] == ["0", "1"]
    assert any(r.get("train/scst_reward") for r in rows if r["epoch"] == "1")
