"""CaptionDataModule: its options refused when it is built, and its loader settings (`auto` picks what
measured fastest for the mode)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from imcap.data.datamodule import CaptionDataModule
from imcap.data.streaming import ShardDataModule
from imcap.errors import ImcapError
from tests.helpers.runs import TINY, assert_one_line_error, module


def _dm(trainable: bool, cacheable: bool | None = None, **kwargs) -> CaptionDataModule:
    dm = CaptionDataModule(source=None, **kwargs)
    dm.attach_encoder(SimpleNamespace(trainable=trainable, cacheable=not trainable if cacheable is None else cacheable))
    return dm


def test_auto_reads_cached_features_in_process():
    assert _dm(trainable=False).loader_workers() == 0
    assert _dm(trainable=True, cacheable=True).loader_workers() == 0  # last_k trains from a cached prefix


def test_auto_decodes_images_in_a_worker_per_core_when_the_encoder_trains(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert _dm(trainable=True).loader_workers() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert _dm(trainable=True).loader_workers() == 8


def test_explicit_settings_are_kept():
    dm = _dm(trainable=False, num_workers=3, pin_memory=True)
    assert dm.loader_workers() == 3 and dm.pin() is True


def test_auto_pins_memory_only_for_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _dm(trainable=False).pin() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _dm(trainable=False).pin() is True


@pytest.mark.parametrize("option,value", [("num_workers", -1), ("num_workers", "many"), ("pin_memory", "yes")])
def test_bad_loader_settings_name_the_option(option, value):
    with pytest.raises(ImcapError, match=rf"data.{option}=.*use auto or"):
        CaptionDataModule(source=None, **{option: value})


@pytest.mark.parametrize("option,value,says", [
    ("batch_size", -1, "give a positive whole number (captions per training batch)"),
    ("batch_size", 0, "give a positive whole number"),
    ("batch_size", 2.5, "give a positive whole number"),
    ("batch_size", True, "give a positive whole number"),
    ("batch_size", "32", "give a positive whole number"),
    ("eval_batch_size", 0, "give a positive whole number (images per evaluation batch), or null for data.batch_size"),
    ("image_size", 0, "give a positive whole number"),
    ("min_freq", 0, "give a positive whole number (times a word is seen to enter the vocabulary; 1: every word)"),
    ("max_vocab_size", 4, "give a whole number >= 5 (words kept, 4 of them special tokens), or null for no limit"),
    ("max_caption_length", -3, "give a positive whole number"),
    ("captions_per_image", 0, "give a positive whole number (captions drawn per image each epoch), or null"),
])
def test_bad_sizes_are_refused_when_the_datamodule_is_built_naming_the_option(option, value, says):
    with pytest.raises(ImcapError) as refused:
        CaptionDataModule(source=None, **{option: value})
    assert str(refused.value).startswith(f"data.{option}={value!r}; {says}")


def test_the_shards_datamodule_refuses_bad_sizes_the_same_way(tmp_path):
    with pytest.raises(ImcapError, match=r"^data.batch_size=0; give a positive whole number"):
        ShardDataModule(root=str(tmp_path), batch_size=0)


def test_null_sizes_keep_their_meaning_and_zero_is_no_null():
    dm = CaptionDataModule(source=None, batch_size=8, eval_batch_size=None, max_vocab_size=None, captions_per_image=None)
    assert dm.eval_batch_size == 8 and dm.max_vocab_size is None and dm.captions_per_image is None
    with pytest.raises(ImcapError, match=r"^data.eval_batch_size=0; "):  # once quietly taken as null
        CaptionDataModule(source=None, batch_size=8, eval_batch_size=0)


@pytest.mark.slow
def test_a_bad_batch_size_is_one_line_before_any_image_is_generated(tmp_path):
    result = module("train", *[o for o in TINY if not o.startswith("data.batch_size=")], "data.batch_size=-1",
                    cwd=tmp_path)
    assert_one_line_error(result, "error: data.batch_size=-1; give a positive whole number")
    assert result.returncode == 2
    assert not (tmp_path / "data").exists(), sorted((tmp_path / "data").rglob("*"))[:5]  # the shapes never made


def test_feature_precision_reaches_the_extraction(monkeypatch, tmp_path):
    from imcap.data import datamodule
    from imcap.data.records import CaptionRecord
    from imcap.data.vocab import Vocabulary

    seen = {}

    def fake_extract(encoder, paths, transform, cache_dir, fingerprint, **kwargs):
        seen.update(kwargs)
        return torch.zeros(len(paths), 2, 3).numpy()

    monkeypatch.setattr(datamodule, "extract_features", fake_extract)
    source = SimpleNamespace(name="toy", records=lambda: [CaptionRecord("a", str(tmp_path / "a.jpg"), ("a dog",), "train")])
    dm = CaptionDataModule(source=source, feature_precision="bf16", cache_dir=str(tmp_path))
    dm.attach_encoder(SimpleNamespace(trainable=False, cacheable=True, image_transform=lambda size: None,
                                      fingerprint=lambda transform_desc: "f"))
    dm.build_vocab(Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"]))
    dm._dataset("train")  # the train split alone: the fake source has no val images
    assert seen["precision"] == "bf16"


def test_unknown_feature_precision_names_the_option():
    with pytest.raises(ImcapError, match=r"data.feature_precision='fp8'; choose one of \['fp32', 'bf16'\]"):
        CaptionDataModule(source=None, feature_precision="fp8")


def test_hflip_gives_the_training_split_a_mirrored_cache_and_leaves_evaluation_alone(monkeypatch, tmp_path):
    from imcap.data import datamodule
    from imcap.data.images import image_transform
    from imcap.data.records import CaptionRecord

    transforms = []

    def fake_extract(encoder, paths, transform, cache_dir, fingerprint, **kwargs):
        transforms.append((kwargs["description"], transform))
        return torch.zeros(len(paths), 2, 3).numpy()

    monkeypatch.setattr(datamodule, "extract_features", fake_extract)
    records = [CaptionRecord("a", str(tmp_path / "a.jpg"), ("a dog on the left",), "train"),
               CaptionRecord("b", str(tmp_path / "b.jpg"), ("a cat",), "val")]
    dm = CaptionDataModule(source=SimpleNamespace(name="toy", records=lambda: records), hflip=True,
                           cache_dir=str(tmp_path))
    plain = image_transform(8, (0.5,) * 3, (0.5,) * 3)
    dm.attach_encoder(SimpleNamespace(trainable=False, cacheable=True, image_transform=lambda size: plain,
                                      fingerprint=lambda transform_desc: transform_desc))
    dm.build_vocab()
    dm.setup("fit")
    assert [d for d, _ in transforms] == ["train", "train, mirrored", "val"]
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert torch.equal(transforms[1][1](image), plain(image).flip(-1))
    assert dm.datasets["train"].mirror and not dm.datasets["val"].mirror
    assert not any(dm.datasets["val"].is_mirrored(k) for k in range(len(dm.datasets["val"])))
