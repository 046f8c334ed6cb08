"""The weights-and-JSON folder: a round trip captions identically; a config.json naming code,
or a repo id without network, is one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imcap.errors import ImcapError
from imcap.models.captioner import Captioner
from imcap.registry import allowed_targets
from tests.helpers.checkpoints import write_untrained_checkpoint
from tests.helpers.hub_server import serve_hub_repo
from tests.helpers.paths import ROOT
from tests.test_plugins import USER_CONF, example_imported  # noqa: F401  (a fixture: the example plugin imported)


@pytest.fixture
def captioner(make_cfg, tmp_path) -> Captioner:
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    return Captioner.from_checkpoint(tmp_path / "model.ckpt")


@pytest.fixture
def images(tmp_path) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]


def test_a_round_trip_gives_the_same_weights_and_captions(captioner, images, tmp_path):
    folder = captioner.save_pretrained(tmp_path / "shared", metrics={"test/BLEU-4": 0.25, "val/loss": 1.0})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "vocab.json"]
    config = json.loads((folder / "config.json").read_text())
    targets = [node["_target_"] for node in config["architecture"].values()
               if isinstance(node, dict) and node.get("_target_")]
    assert targets and all(t in allowed_targets() for t in targets)
    assert "| test/BLEU-4 | 0.2500 |" in (folder / "README.md").read_text()
    assert len(load_file(folder / "model.safetensors")) > 0  # plain tensors, no pickle

    loaded = Captioner.from_pretrained(folder)
    ours, theirs = captioner.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [c.text for c in loaded.caption(images)] == [c.text for c in captioner.caption(images)]
    assert loaded.decoding == captioner.decoding and loaded.vocab == captioner.vocab


@pytest.mark.parametrize(("where", "value"), [
    ("decoder", {"_target_": "torch.save", "_args_": ["x", "victim"]}),
    ("dropout", {"_target_": "numpy.save"}),
])
def test_a_config_json_naming_code_is_refused(captioner, tmp_path, where, value):
    folder = captioner.save_pretrained(tmp_path / "shared")
    config = json.loads((folder / "config.json").read_text())
    if where == "decoder":
        config["architecture"]["decoder"] = value
    else:
        config["architecture"]["decoder"]["dropout"] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImcapError, match=r"model config .*config.json is refused: architecture\.decoder"):
        Captioner.from_pretrained(folder)
    assert not (tmp_path / "victim").exists() and not os.path.exists("victim")


def test_a_folder_without_weights_says_how_to_make_one(captioner, tmp_path):
    folder = captioner.save_pretrained(tmp_path / "shared")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ImcapError, match="model.safetensors missing; write one with `python -m imcap.export"):
        Captioner.from_pretrained(folder)


@pytest.mark.slow
def test_a_repo_id_without_network_is_one_line_naming_what_to_place_where(tmp_path):
    with socket.socket() as s:  # a local port nobody listens on: the Hub is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"),
           "IMCAP_ROOT": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "imcap.caption", "ckpt_path=someone/captioner",
                             f"images=[{ROOT / 'experiments' / 'attention_variants' / 'example-attention.png'}]"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot download model 'someone/captioner' from the Hugging Face Hub")
    assert "hf download someone/captioner --local-dir DIR" in line
    assert "config.json, model.safetensors and vocab.json" in line


@pytest.mark.slow
def test_a_repo_id_is_downloaded_from_the_hub_and_captions_like_the_folder(captioner, images, tmp_path):
    folder = captioner.save_pretrained(tmp_path / "shared")
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    server = serve_hub_repo(folder, "someone/captioner")
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
               "HF_HOME": str(tmp_path / "hf"), "IMCAP_ROOT": str(tmp_path)}
        result = subprocess.run([sys.executable, "-m", "imcap.caption", "ckpt_path=someone/captioner",
                                 f"images=[{tmp_path}/0.png,{tmp_path}/1.png,{tmp_path}/2.png]"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    expected = captioner.caption([tmp_path / f"{i}.png" for i in range(3)])
    assert result.stdout.splitlines() == [f"{tmp_path}/{i}.png\t{c.text}" for i, c in enumerate(expected)]
    assert list((tmp_path / "hf" / "hub").glob("models--someone--captioner/snapshots/*/model.safetensors"))


@pytest.mark.slow
def test_a_revision_pins_the_download_and_an_unpinned_repo_id_warns_once_naming_its_commit(captioner, tmp_path):
    import copy

    old = captioner.save_pretrained(tmp_path / "v1")  # says "a a a ..."
    newer = copy.deepcopy(captioner)
    with torch.no_grad():
        newer.decoder.output.bias[newer.vocab.stoi["red"]] += 1000.0  # the owner pushes a model that says "red"
    new = newer.save_pretrained(tmp_path / "main")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "photo.png")
    server = serve_hub_repo(new, "someone/captioner", sha="2" * 40, tags={"v1": (old, "1" * 40)})
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
           "HF_HOME": str(tmp_path / "hf"), "IMCAP_ROOT": str(tmp_path)}

    def caption(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "imcap.caption", "ckpt_path=someone/captioner",
                               f"images=[{tmp_path}/photo.png]", *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    try:
        pinned, newest = caption("revision=v1"), caption()
    finally:
        server.shutdown()
    assert pinned.returncode == 0 and newest.returncode == 0, pinned.stderr[-3000:] + newest.stderr[-3000:]
    assert pinned.stdout.split("\t")[1].split()[0] == "a"  # v1's model, not the newest upload
    assert newest.stdout.split("\t")[1].split()[0] == "red"
    assert "pin it with" not in pinned.stderr
    assert newest.stderr.count(f"which changes whenever its owner pushes; pin it with revision={'2' * 40}") == 1


def test_a_model_folder_of_a_newer_format_says_to_upgrade(captioner, tmp_path):
    folder = captioner.save_pretrained(tmp_path / "shared")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "imcap_format": 2}))
    with pytest.raises(ImcapError, match=r"config.json has imcap_format=2, a newer format than this imcap .* "
                                         r"reads \(up to 1\); upgrade imcap"):
        Captioner.from_pretrained(folder)


def test_the_model_card_names_the_dataset_not_the_folder_it_was_read_from(captioner, tmp_path):
    data = {"source": {"_target_": "imcap.data.sources.coco.CocoSource", "root": "/home/alice/data/coco",
                       "year": 2017}}
    card = (captioner.save_pretrained(tmp_path / "shared", data=data) / "README.md").read_text()
    assert "Dataset: coco, year=2017" in card
    assert "alice" not in card and "/home" not in card
    assert "revision=<commit>" in card  # the usage line pins a revision


@pytest.mark.usefixtures("example_imported")
def test_the_model_card_of_a_plugins_model_passes_its_modules_in_every_command(make_cfg, tmp_path):
    cfg = make_cfg(*USER_CONF, "model/attention=cosine", out=tmp_path / "train")
    write_untrained_checkpoint(cfg, tmp_path / "model.ckpt")
    card = (Captioner.from_checkpoint(tmp_path / "model.ckpt").save_pretrained(tmp_path / "shared")
            / "README.md").read_text()
    assert 'revision="<commit>", plugins=["imcap_example_plugin.attention"])' in card
    assert "revision=<commit> plugins=[imcap_example_plugin.attention] 'images=[photo.jpg]'" in card
