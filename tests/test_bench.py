"""`python -m imcap.bench` runs end to end at tiny sizes (--smoke) and writes the JSON the
README and experiments read. Its numbers are not checked: speed belongs in the bench."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from imcap import bench, bench_gpu


@pytest.fixture
def jpegs(tmp_path, monkeypatch):
    """A stand-in for ../shared/data/flickr8k-1k: four small JPEG files."""
    root = tmp_path / "flickr8k-1k"
    (root / "Images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(pixels).save(root / "Images" / f"{i}.jpg")
    (root / "captions.txt").write_text("image,caption\n" + "".join(
        f"{i}.jpg,A dog runs on the grass .\n{i}.jpg,A black dog is running .\n" for i in range(4)))
    monkeypatch.setattr(bench, "SHARED", root)
    return root


def test_quick_smoke_run_writes_every_section(tmp_path, jpegs, one_thread):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--smoke", "--output", str(out), "--override", "model.optimizer.fused=false"])
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["overrides"] == ["model.optimizer.fused=false"]
    machine = results["machine"]
    assert {"cpu", "cores", "torch_threads", "torch", "load_average"} <= machine.keys()
    assert "load_average_after" in results and results["wall_s"] > 0
    assert [g["dtype"] for g in results["gemm"]] == ["fp32", "bf16"]

    train = results["decoder_train"]
    assert [(r["decoder"], r["attention"], r["dtype"]) for r in train] == [("lstm", "additive", "fp32"),
                                                                        ("lstm", "additive", "bf16")]
    for row in train:
        assert row["captions_per_s"] > 0 and row["gflop_per_step"] > 0 and row["fraction_of_gemm"] > 0
        assert row["optimizer"] == "AdamW"  # the override reached the optimiser (fused by default)
    assert len({r["gflop_per_step"] for r in train}) == 1  # counted once, in fp32

    beams = results["beam_search"]
    assert [(r["beam_size"], r["dtype"]) for r in beams] == [(3, "fp32"), (3, "bf16"), (5, "fp32"), (5, "bf16")]
    assert all(r["images_per_s"] > 0 for r in beams)

    features = results["feature_extraction"]
    assert [(r["encoder"], r["dtype"], r["images"]) for r in features] == [("mobilenet_v2", "fp32", 4),
                                                                           ("mobilenet_v2", "bf16", 4)]
    assert "epoch" not in results  # not in --quick
    caption = results["caption"]
    assert [(r["run"], r["decoding"]) for r in caption] == [
        ("encoder only", "-"), ("default", "beam 16 + rerank 50"), ("encoder only, precision=bf16", "-"),
        ("default, precision=bf16", "beam 16 + rerank 50"), ("beam 3", "beam 3"), ("greedy", "greedy"),
        ("one photo at a time", "beam 16 + rerank 50")]
    assert [r["photos"] for r in caption] == [4, 4, 4, 4, 4, 4, 1]
    for row in caption:
        assert row["photos_per_s"] > 0 and row["fraction_of_encoder"] > 0 and row["x_one_photo_loop"] > 0
        assert row["cpu_bf16"] and "load_average" in row
    # how many bf16 captions are the fp32 ones: a fraction of the 4 photos, only on the bf16 decoding row
    assert [r["captions_as_fp32"] for r in caption if r["captions_as_fp32"] != "-"] in ([0.0], [0.25], [0.5], [0.75],
                                                                                        [1.0])
    assert caption[3]["captions_as_fp32"] != "-"
    assert results["bf16"]["captions_as_fp32"] == caption[3]["captions_as_fp32"]
    assert results["bf16"]["caption_why"].startswith("bf16 captioning (precision=bf16) gives the fp32 caption for")
    if not torch.cuda.is_available():
        assert results["gpu"] == bench_gpu.NO_CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the section runs")
def test_gpu_section_says_plainly_that_it_did_not_run(capsys, one_thread):
    results = bench.run(True, ("gemm", "gpu"), bench.SMOKE)
    assert results["gpu"].startswith("skipped: no CUDA device here")
    bench.print_tables(results, bench.Console(width=200))
    assert "gpu: skipped: no CUDA device here" in capsys.readouterr().out


@pytest.mark.slow
def test_epoch_section_trains_one_epoch_of_the_flickr8k_experiment(tmp_path, jpegs, one_thread):
    names = [f"{i}.jpg" for i in range(4)]
    for i in range(4, 10):  # enough images for a train/val/test split
        Image.open(jpegs / "Images" / "0.jpg").save(jpegs / "Images" / f"{i}.jpg")
        names.append(f"{i}.jpg")
    rows = [f"{n},a dog runs on the grass number {k}" for n in names for k in range(5)]
    (jpegs / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    results = bench.run(False, ("gemm", "epoch"), bench.SMOKE)
    epochs = results["epoch"]
    assert [e["dtype"] for e in epochs] == ["fp32", "bf16"]
    for e in epochs:
        assert e["data"] == "flickr8k-1k" and e["epoch_s"] > 0
        assert e["train_captions"] % 5 == 0 and 5 <= e["train_captions"] < 50  # all 5 captions of each train image


def test_sections_needing_the_shared_data_are_skipped_without_it(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(bench, "SHARED", tmp_path / "absent")
    results = bench.run(True, ("gemm", "feature_extraction"), bench.SMOKE)
    assert results["feature_extraction"].startswith("skipped:")
    assert "decoder_train" not in results and "beam_search" not in results


def test_unknown_sections_are_refused():
    from imcap.errors import ImcapError

    with pytest.raises(ImcapError, match="unknown bench section"):
        bench.run(True, ("gemm", "decoder"), bench.SMOKE)


def test_gpu_section_code_runs_on_cpu_at_tiny_sizes(tmp_path, one_thread):
    """The gpu section's parts with device=cpu (what a GPU machine runs, minus the device)."""
    sizes = bench.SMOKE
    rate = bench_gpu.gemm_rate(True, device="cpu", n=64)
    train = bench_gpu.decoder_train(True, rate, sizes, device="cpu", batches=(2, 3))
    assert [(r["decoder"], r["batch"]) for r in train] == [("lstm", 2), ("lstm", 3)]
    assert all(r["captions_per_s"] > 0 and r["fraction_of_bf16_gemm"] > 0 for r in train)
    assert bench_gpu.beam(True, sizes, device="cpu", batch=2)[0]["images_per_s"] > 0
    feats = bench_gpu.features(True, tmp_path / "absent", device="cpu", count=2, size=32)
    assert feats[0]["source"] == "synthetic 500x375" and feats[0]["images_per_s"] > 0


def test_feature_extraction_of_chosen_timm_and_open_clip_encoders(tmp_path, jpegs, one_thread):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--smoke", "--sections", "feature_extraction", "--output", str(out),
                "--encoders", "timm:resnet18,open_clip:RN50"])
    rows = json.loads(out.read_text())["feature_extraction"]
    assert [(r["encoder"], r["dtype"], r["grid"], r["channels"]) for r in rows] == [
        ("timm:resnet18", "fp32", 1, 512), ("timm:resnet18", "bf16", 1, 512),
        ("open_clip:RN50", "fp32", 1, 2048), ("open_clip:RN50", "bf16", 1, 2048)]  # 32 pixels: one cell
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.parametrize(("fp32", "bf16", "pays"), [(154.0, 384.0, True), (189.0, 140.0, False)])
def test_bf16_verdict_records_the_cpu_flags_both_gemm_rates_and_why(monkeypatch, fp32, bf16, pays):
    monkeypatch.setattr(bench, "cpu_bf16_flags", lambda: "avx512_bf16")
    train = [{"decoder": "lstm", "attention": "additive", "grid": "7x7x2048", "dtype": d, "captions_per_s": c,
              "fraction_of_gemm": f} for d, c, f in (("fp32", 60.0, 0.5), ("bf16", 102.0, 0.3))]
    verdict = bench.bf16_verdict({"fp32": fp32, "bf16": bf16}, train)
    assert verdict["cpu_bf16"] == "avx512_bf16"
    assert (verdict["fp32_gemm_gflops_per_s"], verdict["bf16_gemm_gflops_per_s"]) == (fp32, bf16)
    assert verdict["bf16_over_fp32_gemm"] == pytest.approx(bf16 / fp32)
    assert verdict["bf16_over_fp32_training"] == pytest.approx(1.7)
    assert verdict["bf16_training_fraction_of_gemm"] == 0.3
    assert verdict["why"].startswith("bf16 GEMM runs at 2.5x" if pays else "fp32 stays the default: bf16 GEMM runs at only 0.7x")
    assert ("(1.7x fp32 captions/s in this run)" in verdict["why"]) == pays
    assert "avx512_bf16" in verdict["why"]


def test_every_run_says_whether_bf16_pays_on_this_cpu(capsys, one_thread):
    results = bench.run(True, ("gemm",), bench.SMOKE)
    assert results["bf16"]["cpu_bf16"] == bench.cpu_bf16_flags()
    assert "bf16_over_fp32_training" not in results["bf16"]  # no decoder_train section
    bench.print_tables(results, bench.Console(width=200))
    assert f"bf16: {results['bf16']['why']}" in capsys.readouterr().out


@pytest.mark.parametrize(("agree", "says"), [(0.89, "below the 95% a default needs: imcap.caption stays fp32"),
                                             (0.96, "precision=bf16 may caption by default here")])
def test_the_bf16_caption_verdict_holds_bf16_to_95_percent_of_fp32_captions(agree, says):
    rows = [{"run": "default", "captions_as_fp32": "-"}, {"run": "default, precision=bf16", "captions_as_fp32": agree}]
    assert bench.caption_verdict(rows)["caption_why"].endswith(says)
    assert bench.caption_verdict("skipped: no data") == {}
