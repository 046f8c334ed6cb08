"""`imcap.caption` and `Captioner` without Lightning: captions for image files, one attention plot
per image even when names repeat; folders searched with their subfolders; a foreign checkpoint
is a one-line error; bad files are skipped and listed; results stream to a JSONL and a run
killed with SIGKILL resumes from it; an output holds one command's captions and one run at a
time; Ctrl-C and SIGTERM stop with one line; the batched fast path gives the captions of the
one-path `Captioner.caption`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from imcap.caption import caption_images, list_images, plot_file_names
from imcap.errors import ImcapError
from imcap.models.captioner import Captioner
from tests.helpers.checkpoints import write_untrained_checkpoint
from tests.helpers.runs import assert_one_line_error, ctrl_c_as_in_a_terminal, module


def test_images_with_the_same_name_in_different_folders_get_their_own_plots(make_cfg, tmp_path):
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / folder / "x.png")
    cfg = make_cfg(f"ckpt_path={tmp_path}/model.ckpt", f"images=[{tmp_path}/a/x.png,{tmp_path}/b/x.png]",
                   "attention_plots=true", "decoding.min_length=3", name="caption", out=tmp_path / "cap")
    caption_images(cfg)
    written = json.loads((tmp_path / "cap" / "captions.json").read_text())
    assert [w["image"] for w in written] == [f"{tmp_path}/a/x.png", f"{tmp_path}/b/x.png"]
    plots = [w["attention_plot"] for w in written]
    assert len(set(plots)) == 2 and all(Image.open(p).size for p in plots)
    assert sorted(p.name for p in (tmp_path / "cap" / "attention").iterdir()) == ["1-x.png", "2-x.png"]


@pytest.mark.slow
def test_captioner_loads_without_lightning_and_captions_files(trained, make_cfg, tmp_path, data_dir):
    out, _ = trained
    images = sorted(p for p in data_dir.rglob("test_0000*.png"))[:2]
    captioner = Captioner.from_checkpoint(out / "checkpoints" / "best.ckpt")
    captions = captioner.caption(images)
    assert len(captions) == 2 and all(c.text == " ".join(c.words) for c in captions)
    cfg = make_cfg(f"ckpt_path={out}/checkpoints/best.ckpt", f"images=[{images[0]},{images[1]}]",
                   "attention_plots=true", name="caption", out=tmp_path / "cap")
    results = caption_images(cfg)
    written = json.loads((tmp_path / "cap" / "captions.json").read_text())
    assert [w["caption"] for w in written] == [c.text for _, c in results] == [c.text for c in captions]
    assert len(list((tmp_path / "cap" / "attention").glob("*.png"))) == sum(bool(c.words) for c in captions)


@pytest.mark.slow
def test_a_list_of_checkpoints_captions_as_their_ensemble(trained_run, tmp_path):
    from imcap.models.ensemble import DecoderEnsemble

    best = trained_run / "checkpoints" / "best.ckpt"
    alone, both = Captioner.load(best), Captioner.load([str(best), str(best)])
    assert isinstance(both.decoder, DecoderEnsemble) and len(both.decoder.members) == 2
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200))]
    assert [c.text for c in both.caption(images)] == [c.text for c in alone.caption(images)]


def test_unreadable_image_names_the_file(tmp_path):
    # a foreign checkpoint is refused before images are read

    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    result = module("caption", f"ckpt_path={tmp_path}/foreign.ckpt", f"images=[{tmp_path}/x.jpg]", cwd=tmp_path)
    assert_one_line_error(result, "image not found", "x.jpg")
    (tmp_path / "x.jpg").write_text("not a jpeg")
    result = module("caption", f"ckpt_path={tmp_path}/foreign.ckpt", f"images=[{tmp_path}/x.jpg]", cwd=tmp_path)
    assert_one_line_error(result, "was not written by imcap training")


def write_photos(folder, count: int, seed: int = 0) -> list:
    """`count` small JPEG files as a camera app saves them (PIL, quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        paths.append(folder / f"IMG_{i:04d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bad_files_are_skipped_and_listed_and_the_others_captioned(make_cfg, tmp_path):
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    photos = tmp_path / "photos"
    good = write_photos(photos, 3)
    (photos / "empty.jpg").touch()  # a copy that never got its bytes
    data = good[0].read_bytes()
    (photos / "cut.jpg").write_bytes(data[: len(data) // 2])  # a download stopped half-way
    (photos / "noise.png").write_bytes(os.urandom(500))
    (photos / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")  # the file it named vanished
    (photos / "IMG_0100.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + os.urandom(64))
    (photos / "IMG_0101.DNG").write_bytes(b"II*\x00" + os.urandom(64))
    (photos / "locked.jpg").write_bytes(data)
    (photos / "locked.jpg").chmod(0)
    (photos / "notes.txt").write_text("holiday 2026")
    bad = {"empty.jpg": "cannot read image", "cut.jpg": "cannot read image", "noise.png": "cannot read image",
           "gone.jpg": "image not found", "IMG_0100.HEIC": "cannot read image",
           "IMG_0101.DNG": "format not supported (convert to JPEG/PNG)"}
    if os.geteuid() != 0:  # root reads a file whatever its mode
        bad["locked.jpg"] = "Permission denied"
    else:
        good.append(photos / "locked.jpg")
    result = module("caption", f"ckpt_path={tmp_path}/model.ckpt", f"images=[{photos}]", "batch_size=2",
                    f"output={tmp_path}/out/captions.json", cwd=tmp_path)
    assert_one_line_error(result, f"captioned {len(good)}, skipped {len(bad)}", "captions.skipped.json")
    for name, reason in bad.items():
        line = next(ln for ln in result.stderr.splitlines() if ln.startswith(f"skipped {photos / name}:"))
        assert reason in line
    assert "notes.txt" in result.stderr  # named as not captioned, not counted as a failure
    assert sorted(line.split("\t")[0] for line in result.stdout.splitlines()) == sorted(map(str, good))
    streamed = read_lines(tmp_path / "out" / "captions.jsonl")
    assert sorted(e["image"] for e in streamed) == sorted(map(str, good))
    assert json.loads((tmp_path / "out" / "captions.json").read_text()) == sorted(streamed, key=lambda e: e["image"])
    skipped = json.loads((tmp_path / "out" / "captions.skipped.json").read_text())
    assert {os.path.basename(s["image"]): s["reason"] for s in skipped}.keys() == bad.keys()
    assert all("\n" not in s["reason"] for s in skipped)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF decoder")
def test_an_avif_photo_is_captioned_where_pillow_decodes_it(make_cfg, tmp_path):
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(tmp_path / "photos" / "IMG_0001.avif")
    result = module("caption", f"ckpt_path={tmp_path}/model.ckpt", f"images=[{tmp_path}/photos]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "captioned 1, skipped 0" in result.stderr


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_without_captioning_a_file_twice(make_cfg, tmp_path):
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    photos = write_photos(tmp_path / "photos", 400)
    command = [sys.executable, "-m", "imcap.caption", f"ckpt_path={tmp_path}/model.ckpt",
               f"images=[{tmp_path}/photos]", "batch_size=2"]
    work = tmp_path / "work"  # a new working directory; the default output, in logs/caption/runs/<time>
    work.mkdir()
    env = {**os.environ, "IMCAP_ROOT": str(work)}
    first = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(work.glob("logs/caption/runs/*/captions.jsonl")) or \
            len(read_lines(next(work.glob("logs/caption/runs/*/captions.jsonl")))) < 4:
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    (jsonl,) = work.glob("logs/caption/runs/*/captions.jsonl")
    before = {e["image"] for e in read_lines(jsonl)}
    assert 4 <= len(before) < len(photos)  # stopped part-way

    time.sleep(1.1)  # the run directory is named by the second
    second = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"captioned {len(photos)}, skipped 0" in second.stderr
    again = {line.split("\t")[0] for line in second.stdout.splitlines()}
    assert again == {str(p) for p in photos} - before  # only what the killed run had not written
    lines = read_lines(jsonl)  # the same file, continued
    assert sorted(e["image"] for e in lines) == sorted(str(p) for p in photos)  # each once
    written = json.loads((jsonl.parent / "captions.json").read_text())
    assert [e["image"] for e in written] == [str(p) for p in photos]
    assert list(work.glob("logs/caption/runs/*")) == [jsonl.parent]  # the resume left no folder of its own
    assert "Continuing the stopped run" in (jsonl.parent / "caption.log").read_text()  # it logged there
    # finished: the same command now starts a new run
    third = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and len(third.stdout.splitlines()) == len(photos)


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_that_says_how_to_continue(make_cfg, tmp_path):
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    write_photos(tmp_path / "photos", 400)
    out = tmp_path / "out" / "captions.json"
    run = subprocess.Popen([sys.executable, "-m", "imcap.caption", f"ckpt_path={tmp_path}/model.ckpt",
                            f"images=[{tmp_path}/photos]", "batch_size=2", f"output={out}"], cwd=tmp_path,
                           env={**os.environ, "IMCAP_ROOT": str(tmp_path)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    jsonl = out.with_suffix(".jsonl")
    deadline = time.monotonic() + 120
    while not jsonl.is_file() or len(read_lines(jsonl)) < 2:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: interrupted (Ctrl-C); ") and "of 400 images captioned in" in line
    assert "run the same command again to continue" in line
    assert len(stdout.splitlines()) == len(read_lines(jsonl))  # what it printed, it had written


@pytest.mark.slow
def test_the_batched_path_gives_the_captions_of_the_one_path_captioner(make_cfg, tmp_path, data_dir, monkeypatch):
    """The fast path (workers, BatchNorm-folded encoder, batched search, tensor reranking) against
    `Captioner.caption` with the Python reranking and the plain beam search they replaced, for greedy,
    beam 3 and reranking."""
    from imcap.models import search
    from imcap.train import train
    from tests.models.test_rerank import plain_choose
    from tests.models.test_search import plain_beam_search

    train(make_cfg("model.decoding.method=beam", "model.decoding.rerank_neighbours=5",
                   "model.decoding.rerank_beams=6", "trainer.max_epochs=4", out=tmp_path / "train"))
    best = tmp_path / "train" / "checkpoints" / "best.ckpt"
    images = sorted(data_dir.rglob("test_*.png"))[:6]
    captioner = Captioner.from_checkpoint(best)
    assert captioner.decoding.reranks and captioner.memory is not None
    for name, change in (("greedy", {"method": "greedy"}), ("beam3", {"rerank_neighbours": 0}), ("rerank", {})):
        overrides = [f"decoding.{k}={v}" for k, v in change.items()]
        cfg = make_cfg(f"ckpt_path={best}", f"images=[{','.join(map(str, images))}]", "batch_size=4", *overrides,
                       name="caption", out=tmp_path / name)
        fast = [c.text for _, c in caption_images(cfg)]
        with monkeypatch.context() as m:
            m.setattr(search, "pick_by_consensus", lambda *a: torch.tensor(plain_choose(*a), dtype=torch.long))
            m.setattr(search, "beam_search", plain_beam_search)  # and the beam search as first written
            decoding = search.Decoding(**{**captioner.decoding.to_config(), **change})
            plain = [c.text for c in captioner.caption(images, decoding)]
        assert fast == plain, name
        assert len(set(plain)) > 1  # captions that differ between images


def test_folders_are_searched_with_their_subfolders_once_each(tmp_path):
    photos = tmp_path / "my_photos"
    for folder in ("beach", "city", "city/night", ".thumbnails"):
        write_photos(photos / folder, 1)
    (photos / "city" / "up").symlink_to(photos)  # a link back up: searched once, not in a loop
    found = list_images([str(photos)])
    assert found.images == [photos / "beach" / "IMG_0000.jpg", photos / "city" / "IMG_0000.jpg",
                            photos / "city" / "night" / "IMG_0000.jpg"]
    assert found.not_searched == [(photos / ".thumbnails", "hidden"), (photos / "city" / "up", "searched already")]
    assert len(set(plot_file_names(found.images))) == 3


def perturbed_copy(checkpoint, path) -> None:
    """Another model in `path`: the checkpoint's weights with one tensor changed."""
    changed = torch.load(checkpoint, weights_only=False)
    key = next(k for k, v in changed["state_dict"].items() if v.is_floating_point())
    changed["state_dict"][key] = changed["state_dict"][key] + 1.0
    torch.save(changed, path)


def test_an_output_holds_the_captions_of_one_command(make_cfg, tmp_path):
    model = tmp_path / "model.ckpt"
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), model)
    photos = write_photos(tmp_path / "photos", 2)
    out = tmp_path / "out"

    def cfg(*overrides: str, ckpt=model, image=photos[0]):
        return make_cfg(f"ckpt_path={ckpt}", f"images=[{image}]", *overrides, name="caption", out=out)

    caption_images(cfg())
    written = {name: (out / name).read_bytes() for name in ("captions.json", "captions.jsonl")}
    (tmp_path / "copy.ckpt").write_bytes(model.read_bytes())
    caption_images(cfg(ckpt=tmp_path / "copy.ckpt"))  # the same model read from elsewhere: the same command
    Captioner.from_checkpoint(model).save_pretrained(tmp_path / "exported")
    caption_images(cfg(ckpt=tmp_path / "exported"))  # and from its export folder
    perturbed_copy(model, tmp_path / "other.ckpt")
    for config, differs in ((cfg(ckpt=tmp_path / "other.ckpt"), "checkpoint (another model's weights)"),
                            (cfg(image=photos[1]), "images"),
                            (cfg("decoding.max_length=5"), "decoding (max_length)"),
                            (cfg("precision=bf16"), "precision (fp32 there, bf16 here)"),
                            (cfg("attention_plots=true"), "attention_plots (false there, true here)")):
        with pytest.raises(ImcapError, match=r"output .*captions\.json holds the captions of another command") as e:
            caption_images(config)
        assert differs in str(e.value) and "give another output=PATH" in str(e.value)
    state = json.loads((out / "captions.run.json").read_text())
    del state["command"]["checkpoint"]  # a record written before the fingerprint was
    (out / "captions.run.json").write_text(json.dumps(state))
    with pytest.raises(ImcapError, match="not recorded: written by an older imcap"):
        caption_images(cfg())
    assert {name: (out / name).read_bytes() for name in written} == written


def test_a_fixed_run_directory_refuses_the_captions_of_a_model_replaced_at_its_path(make_cfg, tmp_path):
    model = tmp_path / "model.ckpt"
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), model)
    write_photos(tmp_path / "my_photos" / "beach", 2)  # in a subfolder only
    command = ("caption", f"ckpt_path={model}", "images=[my_photos]", "hydra.run.dir=captions")
    first = module(*command, cwd=tmp_path)
    assert first.returncode == 0 and "captioned 2, skipped 0" in first.stderr, first.stderr
    written = (tmp_path / "captions" / "captions.json").read_bytes()
    perturbed_copy(model, model)  # retrained, exported again: another model at the same path
    second = module(*command, cwd=tmp_path)
    assert second.returncode == 2 and second.stdout == ""
    assert_one_line_error(second, "captions.json holds the captions of another command",
                          "(not the same: checkpoint (another model's weights))")
    assert (tmp_path / "captions" / "captions.json").read_bytes() == written


def live_processes_in_session(session: int) -> list[int]:
    """The pids of the processes in `session` that have not ended (zombies left out)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, session
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
def test_a_second_run_on_an_output_is_refused_and_sigterm_stops_with_one_line(make_cfg, tmp_path):
    write_untrained_checkpoint(make_cfg(out=tmp_path / "train"), tmp_path / "model.ckpt")
    photos = write_photos(tmp_path / "photos", 200)
    out = tmp_path / "out" / "captions.json"
    command = [sys.executable, "-m", "imcap.caption", f"ckpt_path={tmp_path}/model.ckpt",
               f"images=[{tmp_path}/photos]", "batch_size=2", f"output={out}"]  # one DataLoader worker
    env = {**os.environ, "IMCAP_ROOT": str(tmp_path)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        jsonl = out.with_suffix(".jsonl")
        deadline = time.monotonic() + 120
        while not jsonl.is_file() or len(read_lines(jsonl)) < 2:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the output, as a slow run does
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and second.stdout == ""
        assert_one_line_error(second, f"another imcap.caption is writing {out}")

        os.kill(first.pid, signal.SIGTERM)
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=60)
        assert first.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
        (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        done = len(read_lines(jsonl))
        assert line.startswith("error: interrupted (SIGTERM); ") and f"{done} of 200 images captioned in {jsonl}" in line
        assert "run the same command again to continue" in line and len(stdout.splitlines()) == done
        deadline = time.monotonic() + 30  # its DataLoader worker ends with it (a limit, not a speed)
        while live_processes_in_session(first.pid):
            assert time.monotonic() < deadline, live_processes_in_session(first.pid)
            time.sleep(0.2)
    finally:  # a failed assertion must not leave it stopped, holding the output, for ever
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()

    third = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and len(third.stdout.splitlines()) == 200 - done, third.stderr
    assert sorted(e["image"] for e in read_lines(jsonl)) == sorted(map(str, photos))
