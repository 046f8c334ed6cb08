"""`python -m imcap.data prepare|stats|features` as a user runs them.

Two subprocess runs (a download from a local mirror, an offline failure); the rest call `main()`
in process, which composes the same Hydra config.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from imcap.data.__main__ import main
from imcap.data.tokenizer import tokenize
from tests.helpers.http_server import closed_port
from tests.helpers.images import jpeg_bytes
from tests.helpers.paths import FLICKR_1K

SHAPES_TINY = ["data.source.num_images={train:12,val:4,test:4}", "data.source.image_size=64"]


class PartlyPretrained(nn.Embedding):
    """Stands in for a pretrained embedding: `found` marks the words in `known`."""

    def __init__(self, vocab, dim: int = 8, known=("a", "red", "circle")):
        super().__init__(len(vocab), dim)
        self.found = torch.tensor([w in known for w in vocab], dtype=torch.bool)  # (V,)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("IMCAP_ROOT", str(tmp_path))
    monkeypatch.setenv("IMCAP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("IMCAP_DOWNLOAD_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imcap.data", *args], capture_output=True, text=True,
                          timeout=300, cwd=env["IMCAP_ROOT"], env={**os.environ, **env})


def test_prepare_flickr30k_from_a_mirror_then_stats(env, server, capsys):
    names = [f"{i}.jpg" for i in range(10)]
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    karpathy = {"images": [{"filename": n, "imgid": i, "split": s,
                            "sentences": [{"raw": f"A dog number {i} runs ."}, {"raw": "A red ball ."}]}
                           for i, (n, s) in enumerate(zip(names, splits))]}
    kaggle = io.BytesIO()
    with zipfile.ZipFile(kaggle, "w") as zf:  # the Kaggle zip's nesting
        zf.writestr("flickr30k_images/results.csv", "image_name| comment_number| comment\n"
                    + "".join(f"{n}| 0| A dog .\n" for n in names))
        for i, n in enumerate(names):
            zf.writestr(f"flickr30k_images/flickr30k_images/{n}", jpeg_bytes((20 * i, 0, 0)))
    splits_zip = io.BytesIO()
    with zipfile.ZipFile(splits_zip, "w") as zf:
        zf.writestr("dataset_flickr30k.json", json.dumps(karpathy))
        zf.writestr("dataset_coco.json", "{}")
    server.files["mirror/flickr-image-dataset.zip"] = kaggle.getvalue()
    server.files["mirror/caption_datasets.zip"] = splits_zip.getvalue()
    result = run("prepare", "flickr30k", env={"IMCAP_ROOT": str(env), "IMCAP_DATA_DIR": str(env / "data"),
                                              "IMCAP_DOWNLOAD_BASE_URL": server.url})
    assert result.returncode == 0, result.stderr
    root = env / "data" / "flickr30k"
    assert result.stdout.splitlines()[-1] == f"flickr30k is ready in {root}"
    assert (root / "dataset_flickr30k.json").is_file() and not (root / "dataset_coco.json").exists()
    assert len(list((root / "flickr30k_images" / "flickr30k_images").glob("*.jpg"))) == 10

    assert main(["stats", "--json", "data=flickr30k", "data.min_freq=1"]) == 0  # same env, in process
    stats = json.loads(capsys.readouterr().out)
    assert {s: (v["images"], v["captions"]) for s, v in stats["splits"].items()} == {
        "train": (6, 12), "val": (2, 4), "test": (2, 4), "all": (10, 20)}
    # train words: a dog number runs red ball + the six digits of the train images
    assert stats["vocabulary"]["size"] == 4 + 6 + 6
    assert stats["splits"]["all"]["length"] == {"p50": 3, "p90": 5, "p99": 5, "max": 5}
    assert stats["splits"]["val"]["unk_share"] == pytest.approx(2 / 16)  # "6", "7" are not train words
    assert stats["embedding"]["has_pretrained_vectors"] is False
    assert stats["splits"]["train"]["embedding_coverage"] is None


def test_offline_prepare_fails_fast_in_one_line(tmp_path):
    env = {"IMCAP_ROOT": str(tmp_path), "IMCAP_DATA_DIR": str(tmp_path / "data"),
           "IMCAP_DOWNLOAD_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    start = time.monotonic()
    result = run("prepare", "coco", env=env)
    assert time.monotonic() - start < 20  # imports are most of it; no network wait (nor Lightning)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: cannot reach 127.0.0.1")
    for name in ("caption_datasets.zip", "annotations_trainval2014.zip", "train2014.zip", "val2014.zip"):
        assert name in line
    assert f"put the files in {tmp_path / 'data' / 'coco' / 'downloads'}/" in line


def test_prepare_shapes_generates_and_custom_has_nothing_to_download(env, capsys):
    assert main(["prepare", "shapes", *SHAPES_TINY]) == 0
    assert f"shapes has nothing to download: 20 images ready under {env / 'data' / 'shapes'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # nothing to fetch: it says where your own files go
        main(["prepare", "custom"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"error: data.root={env / 'data' / 'custom'} does not exist: put your images and captions there" in err
    (env / "data" / "custom").mkdir(parents=True)
    (env / "data" / "custom" / "a.jpg").write_bytes(jpeg_bytes((200, 0, 0)))
    (env / "data" / "custom" / "a.txt").write_text("a red square\n")
    assert main(["prepare", "custom"]) == 0
    assert "custom has nothing to download: 1 images ready" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "shards"])
    assert exit_.value.code == 2
    assert "error: data=shards has no source to prepare; choose one of ['coco', 'custom'," in capsys.readouterr().err


SOURCE_PLUGIN = """
from pathlib import Path

from imcap.data.records import CaptionRecord
from imcap.data.resources import Resource
from imcap.registry import register


@register("source", "mirrored_pictures")
class MirroredPictures:
    def __init__(self, root):
        self.root = Path(root)

    def resources(self):
        return (Resource("pictures.zip", "{url}/pictures.zip", size={size}, sha256="{sha256}",
                         present=("pictures",)),)

    def prepare(self):
        assert (self.root / "pictures" / "captions.txt").is_file()

    def records(self):
        lines = (self.root / "pictures" / "captions.txt").read_text().splitlines()
        return [CaptionRecord(str(i), str(self.root / "pictures" / f"{{i}}.jpg"), (line,), "train")
                for i, line in enumerate(lines)]
"""


def test_a_source_of_ones_own_is_prepared_and_listed_without_another_edit(tmp_path, server, monkeypatch):
    """One class (with its resources) and one YAML, from a user's folder: `python -m imcap.data
    prepare` downloads, checks and extracts it, and the help lists it."""
    import hashlib

    from imcap import registry
    from imcap.data.__main__ import _parser

    pictures = io.BytesIO()
    with zipfile.ZipFile(pictures, "w") as zf:
        zf.writestr("pictures/captions.txt", "a red square\na blue circle\n")
        zf.writestr("pictures/0.jpg", jpeg_bytes((200, 0, 0)))
    data = pictures.getvalue()
    server.files["mirror/pictures.zip"] = data
    user = tmp_path / "user"
    (user / "conf" / "data").mkdir(parents=True)
    (user / "my_sources.py").write_text(SOURCE_PLUGIN.format(url=server.url, size=len(data),
                                                             sha256=hashlib.sha256(data).hexdigest()))
    (user / "conf" / "data" / "mirrored_pictures.yaml").write_text(
        "defaults:\n  - _base\n  - _self_\n\nroot: ${paths.data_dir}/mirrored\n"
        "source:\n  _target_: my_sources.MirroredPictures\n")
    env = {"IMCAP_ROOT": str(tmp_path), "IMCAP_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(user),
           "IMCAP_DOWNLOAD_BASE_URL": ""}
    result = run("prepare", "mirrored_pictures", "plugins=[my_sources]", f"hydra.searchpath=[file://{user / 'conf'}]",
                 env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "data" / "mirrored"
    assert result.stdout.splitlines() == [f"placed  pictures.zip: 2 files extracted into {root}",
                                          f"mirrored_pictures is ready in {root}"]
    assert (root / "pictures" / "0.jpg").read_bytes() == jpeg_bytes((200, 0, 0))
    assert server.requests == [("mirror/pictures.zip", None)]

    monkeypatch.syspath_prepend(str(user))
    monkeypatch.setitem(registry._registry, "source", dict(registry.components("source")))  # undone after
    __import__("my_sources")
    assert "mirrored_pictures" in _parser()._subparsers._group_actions[0].choices["prepare"].format_help()


def test_prepare_of_a_source_whose_yaml_is_not_found_says_to_pass_its_config_dir(env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "my_pictures", "plugins=[my_sources]"])  # its YAML in a folder Hydra was not told of
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: In 'train': Could not find 'data/my_pictures'")
    assert err.endswith("a source of your own needs its config directory: hydra.searchpath=[file:///abs/conf] "
                        "(the folder holding data/my_pictures.yaml)\n")


def test_stats_table_and_embedding_coverage_from_the_found_mask(env, capsys):
    assert main(["stats", "--json", *SHAPES_TINY,
                 f"model.embedding._target_={PartlyPretrained.__module__}.PartlyPretrained"]) == 0
    stats = json.loads(capsys.readouterr().out)
    from imcap.data.sources.shapes import ShapesSource

    source = ShapesSource(str(env / "data" / "shapes"), {"train": 12, "val": 4, "test": 4}, image_size=64)
    for split in ("train", "val", "test"):
        tokens = [t for r in source.records() if r.split == split for c in r.captions for t in tokenize(c)]
        counts = Counter(tokens)
        expected = (counts["a"] + counts["red"] + counts["circle"]) / len(tokens)
        assert stats["splits"][split]["embedding_coverage"] == pytest.approx(expected)
        assert stats["splits"][split]["tokens"] == len(tokens)
    assert stats["embedding"]["vocabulary_coverage"] == pytest.approx(3 / (stats["vocabulary"]["size"] - 4))

    assert main(["stats", *SHAPES_TINY]) == 0  # the default learned embedding has no found mask
    table = capsys.readouterr().out
    assert table.splitlines()[2].split() == ["split", "images", "captions", "tokens", "len", "p50", "p90",
                                             "p99", "max", "<unk>", "embedded"]
    assert table.splitlines()[3].split()[:3] == ["train", "12", "60"] and "n/a" in table.splitlines()[3]
    assert "word embeddings (LearnedEmbedding): n/a" in table


def test_user_mistakes_are_one_line_errors(env, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["stats", "data=bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "bogus" in err and "flickr30k" in err and "custom" in err
    with pytest.raises(SystemExit):
        main(["stats", "data=flickr30k", f"data.root={env}/nowhere"])
    assert f"error: data.root={env}/nowhere does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["features", *SHAPES_TINY, "model.encoder.weights=null", "model.encoder.finetune=all"])
    assert "error: nothing to cache" in capsys.readouterr().err


def test_features_extracts_every_split_once(env, capsys):
    args = ["features", *SHAPES_TINY, "model.encoder.weights=null", "data.eval_batch_size=8"]
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in first[1:]] == ["val", "train", "test"]
    assert all("images/s" in ln for ln in first[1:])
    cached = sorted((env / "data" / "features").glob("*.npy"))
    assert sorted(np.load(p, mmap_mode="r").shape[0] for p in cached) == [4, 4, 12]
    assert main(args) == 0  # same seed, same random init: the cache training would read
    assert all("already cached" in ln for ln in capsys.readouterr().out.splitlines()[1:])
    assert sorted((env / "data" / "features").glob("*.npy")) == cached


@pytest.mark.realdata
def test_stats_on_the_real_flickr8k_subset(env, capsys):
    assert main(["stats", "--json", "data=flickr8k", f"data.root={FLICKR_1K}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    with open(FLICKR_1K / "captions.txt", newline="") as f:
        rows = list(csv.reader(f))[1:]
    lengths = np.array([len(tokenize(caption)) for _, caption in rows])
    everything = stats["splits"]["all"]
    assert (everything["images"], everything["captions"], everything["tokens"]) == (1000, 5000, lengths.sum())
    assert sum(stats["splits"][s]["images"] for s in ("train", "val", "test")) == 1000
    assert 700 < stats["splits"]["train"]["images"] < 900
    assert everything["length"]["max"] == lengths.max()
    assert everything["length"]["p50"] == int(np.percentile(lengths, 50, method="inverted_cdf"))
    assert 10 <= everything["length"]["p50"] <= 12 and everything["length"]["p99"] < everything["length"]["max"]
    assert 500 < stats["vocabulary"]["size"] < 1500 and stats["vocabulary"]["min_freq"] == 5
    assert 0 < stats["splits"]["test"]["unk_share"] < 0.2



def _shard_samples(folder):
    from imcap.data.shards import load_index

    return [s for shard in sorted(folder.glob("*.tar")) for s in load_index(shard)]


def test_shards_writes_every_split_in_img2dataset_layout(env, capsys):
    assert main(["shards", f"out={env / 'shards'}", "shard_size=5", *SHAPES_TINY]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[:4] for ln in out] == [["train", "12", "images", "3"], ["val", "4", "images", "1"],
                                              ["test", "4", "images", "1"]]
    from imcap.data.sources.shapes import ShapesSource

    records = ShapesSource(str(env / "data" / "shapes"), num_images={"train": 12, "val": 4, "test": 4},
                           image_size=64).records()
    for split in ("train", "val", "test"):
        expected = [r for r in records if r.split == split]
        samples = _shard_samples(env / "shards" / split)
        assert [(s.image_id, s.captions) for s in samples] == [(r.image_id, r.captions) for r in expected]
    import tarfile

    with tarfile.open(env / "shards" / "train" / "000000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.json", "000000000.png", "000000000.txt"]
    with pytest.raises(SystemExit):  # never mixed into shards written before
        main(["shards", f"out={env / 'shards'}", *SHAPES_TINY])
    assert "already holds shards; choose another out=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["shards", *SHAPES_TINY])
    assert "error: shards needs out=DIR" in capsys.readouterr().err


@pytest.mark.realdata
def test_shards_of_a_real_flickr8k_subset(env, capsys):
    """40 real photos in the Kaggle layout (symlinks into ../shared), written as shards of 16."""
    root = env / "flickr-subset"
    (root / "Images").mkdir(parents=True)
    with open(FLICKR_1K / "captions.txt", newline="") as f:
        header, *rows = list(csv.reader(f))
    names = sorted({name for name, _ in rows})[:40]
    rows = [r for r in rows if r[0] in names]
    for name in names:
        os.symlink(FLICKR_1K / "Images" / name, root / "Images" / name)
    with open(root / "captions.txt", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    assert main(["shards", f"out={env / 'shards'}", "shard_size=16", "data=flickr8k", f"data.source.root={root}"]) == 0
    samples = [s for split in ("train", "val", "test") for s in _shard_samples(env / "shards" / split)]
    assert sorted(s.image_id for s in samples) == names
    assert sum(len(s.captions) for s in samples) == len(rows) == 200
    from imcap.data.shards import read_image_bytes

    first = next(s for s in _shard_samples(env / "shards" / "train"))
    shard = sorted((env / "shards" / "train").glob("*.tar"))[0]
    assert read_image_bytes(shard, first) == (FLICKR_1K / "Images" / first.image_id).read_bytes()


@pytest.mark.parametrize("command,line", [
    (["stats", "data=_base"], "error: data=_base is the base file that every data option extends, not an option: "
                              "choose one of coco, custom, flickr30k, flickr8k, shapes, shards (data=NAME)"),
    (["stats", "data=bogus"], "error: In 'train': Could not find 'data/bogus' Available options in 'data': coco "
                              "custom flickr30k flickr8k shapes shards"),
    # a data option of one's own that extends _base and names no root
    (["features", "hydra.searchpath=[file://{own}]", "data=mine"], "error: data.root is required: give data.root=DIR"),
], ids=["base", "unknown", "own-data-without-root"])
def test_the_data_tools_name_a_base_file_and_a_required_option_as_the_entry_points_do(tmp_path, command, line):
    from tests.helpers.configs import own_data_without_root
    from tests.helpers.runs import assert_one_line_error, module

    own = own_data_without_root(tmp_path / "own")
    work = tmp_path / "work"
    work.mkdir()
    result = module("data", *(arg.format(own=own) for arg in command), cwd=work)
    assert result.returncode == 2
    assert_one_line_error(result, line)
    assert list(work.iterdir()) == []
