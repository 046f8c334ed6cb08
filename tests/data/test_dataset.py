import numpy as np
import torch

from imcap.data.dataset import CaptionDataset, EpochSeededSampler, collate
from imcap.data.records import CaptionRecord
from imcap.data.vocab import Vocabulary


def _records():
    return [
        CaptionRecord(1, "a.png", ("A red circle.", "One red circle on white"), "train"),
        CaptionRecord(2, "b.png", ("a blue square left of a red circle",), "train"),
    ]


def _dataset(per_caption: bool, max_length: int = 30) -> CaptionDataset:
    records = _records()
    vocab = Vocabulary.build([c.lower().replace(".", "").split() for r in records for c in r.captions])
    features = np.arange(2 * 4 * 3, dtype=np.float16).reshape(2, 4, 3)
    return CaptionDataset(records, vocab, per_caption=per_caption, max_length=max_length, features=features)


def test_training_items_are_caption_pairs_and_eval_items_are_images():
    assert len(_dataset(per_caption=True)) == 3
    assert len(_dataset(per_caption=False)) == 2


def test_items_carry_all_normalised_references_and_cached_grid():
    item = _dataset(per_caption=True)[0]
    assert item["references"] == ["a red circle", "one red circle on white"]
    assert item["grid"].shape == (4, 3) and item["grid"].dtype == torch.float32
    assert item["image_id"] == 1


def test_collate_pads_to_the_longest_caption_sorts_longest_first_and_keeps_lengths():
    ds = _dataset(per_caption=True)
    short, long = ds[0], ds[2]
    assert len(short["tokens"]) < len(long["tokens"])
    batch = collate([short, long])  # the decoders' packing wants the longest first
    lengths = [len(long["tokens"]), len(short["tokens"])]
    assert batch["tokens"].shape == (2, max(lengths))
    assert batch["lengths"].tolist() == lengths
    assert (batch["tokens"][1, lengths[1]:] == Vocabulary.pad_id).all()
    assert batch["tokens"][:, 0].eq(Vocabulary.bos_id).all()
    assert batch["grid"].shape == (2, 4, 3)
    assert batch["references"][0] == ["a blue square left of a red circle"]  # every field follows its item
    assert batch["image_ids"] == [long["image_id"], short["image_id"]]


def test_long_captions_are_truncated_but_keep_eos():
    item = _dataset(per_caption=True, max_length=3)[2]
    assert len(item["tokens"]) == 5 and item["tokens"][-1] == Vocabulary.eos_id


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSeededSampler(50, seed=3), EpochSeededSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert sorted(a) == list(range(50))


def test_sampler_draws_k_captions_per_image_each_epoch():
    groups = [[0, 1, 2], [3, 4], [5]]
    sampler = EpochSeededSampler(6, seed=0, groups=groups, per_group=1)
    seen = set()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == 3
        assert sorted(next(g for g in range(3) if i in groups[g]) for i in order) == [0, 1, 2]
        seen |= set(order)
    assert seen == set(range(6))  # every caption is used over the epochs


def test_pad_to_multiple_gives_a_few_fixed_widths():
    items = [{"tokens": torch.arange(n), "references": [], "raw_references": [], "image_id": n, "index": n,
              "grid": torch.zeros(1, 2)} for n in range(2, 20)]
    widths = {collate(items[i:i + 3], pad_to_multiple=8)["tokens"].shape[1] for i in range(0, len(items), 3)}
    assert widths == {8, 16, 24}
    batch = collate(items[:3], pad_to_multiple=8)
    assert batch["lengths"].tolist() == [4, 3, 2] and (batch["tokens"][:, 4:] == Vocabulary.pad_id).all()


def test_sampler_draws_one_caption_per_image_from_the_scst_epoch_on():
    groups = [[0, 1, 2], [3, 4], [5]]
    sampler = EpochSeededSampler(6, seed=0, groups=groups, per_group=None, one_per_group_from=2)
    for epoch, expected in [(0, 6), (1, 6), (2, 3), (5, 3)]:
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == expected
        assert sorted(next(g for g in range(3) if i in groups[g]) for i in order) == \
            sorted(g for g in range(3) for _ in range(len(groups[g]) if expected == 6 else 1))


def _mirrored_dataset() -> tuple[CaptionDataset, Vocabulary]:
    records = _records()
    vocab = Vocabulary.build([c.lower().replace(".", "").split() for r in records for c in r.captions] + [["right"]])
    features = np.zeros((2, 4, 3), dtype=np.float16)  # the mirrored images' grids are ones
    return CaptionDataset(records, vocab, per_caption=True, features=features, mirror=True,
                          mirrored_features=np.ones((2, 4, 3), dtype=np.float16), seed=0), vocab


def test_mirrored_items_read_the_mirrored_grid_and_swap_left_and_right():
    ds, vocab = _mirrored_dataset()
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        item = ds[2]  # "a blue square left of a red circle"
        mirrored = bool(item["grid"][0, 0] == 1)
        word = "right" if mirrored else "left"
        assert item["references"] == [f"a blue square {word} of a red circle"]
        assert vocab.decode_text(item["tokens"]) == f"a blue square {word} of a red circle"
        seen.add(mirrored)
    assert seen == {True, False}  # each epoch draws again


def test_images_are_flipped_when_their_item_is_mirrored(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[:, 0] = 255  # a white left edge
    Image.fromarray(pixels).save(path)
    records = [CaptionRecord(1, str(path), ("a white edge on the left",), "train")]
    vocab = Vocabulary.build([["a", "white", "edge", "on", "the", "left", "right"]])
    to_tensor = lambda image: torch.from_numpy(np.array(image)).permute(2, 0, 1)  # noqa: E731
    ds = CaptionDataset(records, vocab, per_caption=True, transform=to_tensor, mirror=True)
    for epoch in range(20):
        ds.set_epoch(epoch)
        item = ds[0]
        white_column = 5 if "right" in item["references"][0] else 0
        assert item["image"][:, :, white_column].eq(255).all()


def test_persistent_loader_workers_mirror_the_items_of_the_epoch_the_sampler_was_told():
    from torch.utils.data import DataLoader

    from imcap.data.mirror import mirrored_items

    ds, _ = _mirrored_dataset()
    sampler = EpochSeededSampler(len(ds), seed=0, on_epoch=ds.set_epoch)
    loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=1, persistent_workers=True)
    for epoch in range(6):
        sampler.set_epoch(epoch)  # as Lightning does before each epoch's iter(loader)
        served = {int(item["item_id"]): bool(item["grid"][0, 0] == 1) for item in loader}
        expected = mirrored_items(len(ds), seed=0, epoch=epoch)
        assert served == {k: bool(expected[k]) for k in range(len(ds))}
