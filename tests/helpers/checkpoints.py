"""Checkpoints for tests that need one but no training."""

from __future__ import annotations


def write_untrained_checkpoint(cfg, path) -> dict:
    """An imcap checkpoint of the (untrained) model a composed train config describes, written
    the way training writes one; returns it. For tests that need a checkpoint but no training;
    its captions repeat the word "a"."""
    import torch

    from imcap.data.vocab import SPECIALS, Vocabulary
    from imcap.train import build_module

    torch.manual_seed(0)  # the same untrained weights every time
    vocab = Vocabulary([*SPECIALS, "a", "red", "circle", "square"])
    module = build_module(cfg, vocab)
    with torch.no_grad():  # it says "a a a ...": captions with words, whatever the weights
        module.captioner.decoder.output.bias[vocab.stoi["a"]] += 100.0
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint
