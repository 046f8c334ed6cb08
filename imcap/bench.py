"""Benchmarks: `python -m imcap.bench [--quick] [--output bench.json]` (also `make bench`).

Sections (each a list of entries, fp32 and bf16 autocast where it applies; every time is the
median of repeated runs after a warm-up):
- gemm: this machine's own square matrix-multiply throughput, GFLOP/s per dtype; beside it
  (`bf16`) the CPU's bf16 instructions (amx_bf16, avx512_bf16), the ratio of the two rates,
  bf16 training's speed-up over fp32 (decoder_train's first pair) and why fp32 stays the default;
- decoder_train: one training step (forward, backward, AdamW) of every valid decoder x
  attention pair at standard dims (B=32, T=20, V=10,000, embed/hidden/attention 512; grid
  7x7x2048 and 7x7x1280): captions/s, GFLOP/s from the step's FLOP count (matrix products,
  forward and backward, counted op by op by torch's FlopCounterMode) and fraction_of_gemm;
- beam_search: images/s at beam 3 and 5, batch 32, max length 20 (untrained weights, so
  beams rarely end early: a worst case);
- feature_extraction: JPEG files to cached grid features through `extract_features` (what
  training runs), images/s per encoder and precision;
- epoch: wall time of one training epoch on ../shared/data/flickr8k-1k with cached features;
- caption: JPEG files to captions as `imcap.caption` runs (DataLoader workers, feature
  extraction's encoder, batched search): photos/s for the default decoding (16 beams + consensus
  reranking), the same with `precision=bf16` (with the fraction of photos whose caption is the
  fp32 one, `captions_as_fp32`), beam 3 and greedy, beside reading + encoding alone and a one-photo-at-a-time
  `Captioner.caption` loop (the tutorial's way), in the same run, with the load average and the
  CPU's bf16 flags. The model is `--caption-checkpoint` or else the default architecture with
  untrained weights and a neighbour memory of the real captions (its captions run to
  max_length: a worst case for decoding);
- gpu: only where CUDA is (else one line saying so): decoder training at B = 32/256/1024 in
  bf16 with the fraction of the device's bf16 GEMM rate, beam-5 images/s, and JPEG ->
  ResNet-101 features with GPU JPEG decoding (imcap/bench_gpu.py).
Sections that need ../shared/data are skipped with a reason when it is absent.

Models are composed from conf/ as training composes them (the optimiser too); `--override`
adds Hydra overrides, e.g. `--override model.optimizer.fused=false`. The machine's load average
is recorded before and after: on a shared machine, compare numbers taken under similar load.
`--smoke` runs tiny sizes to test the bench itself (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from imcap.bench_models import build_optimizer, compose_model, optimizer_name
from imcap.config_compose import compose_config
from imcap.data.vocab import Vocabulary
from imcap.errors import ImcapError
from imcap.models.captioner import build_decoder
from imcap.models.decoder import valid_pairs
from imcap.models.search import beam_search
from imcap.training.losses import caption_cross_entropy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k"
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes; the defaults are the standard benchmark, SMOKE tests the bench itself."""

    batch: int = 32
    length: int = 20
    vocab: int = 10_000
    grids: tuple[tuple[int, int], ...] = ((49, 2048), (49, 1280))  # (cells, channels)
    gemm: tuple[int, int] = (1024, 2048)  # quick, full
    images: tuple[int, int] = (64, 256)  # quick, full
    image_size: int = 224
    overrides: tuple[str, ...] = ()  # model config overrides, e.g. smaller dims
    # torchvision names, or `library:name` for the other registered encoders (random init)
    encoders: tuple[str, ...] = ("mobilenet_v2", "resnet50", "mobilenet_v3_large", "timm:convnext_nano",
                                 "open_clip:ViT-B-32")
    quick_encoders: int = 1  # how many of them --quick runs
    repeats: dict[str, int] = field(default_factory=dict)  # per section, instead of the defaults
    smoke: bool = False  # the epoch section uses the model overrides and image size too


SMOKE = Sizes(batch=2, length=3, vocab=40, grids=((4, 32),), gemm=(64, 64), images=(4, 4), image_size=32,
              overrides=("model.decoder.hidden_dim=16", "model.embedding.dim=16"),  # attention_dim follows hidden_dim
              encoders=("mobilenet_v2",), repeats={"all": 1}, smoke=True)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": load_average(),  # 1, 5, 15 minutes, when the run started
    }


def _repeats(sizes: Sizes, section: str, default: int) -> int:
    return sizes.repeats.get(section, sizes.repeats.get("all", default))


def bench_gemm(quick: bool, sizes: Sizes = Sizes()) -> list[dict[str, Any]]:
    n = sizes.gemm[0] if quick else sizes.gemm[1]
    out = []
    for dtype in DTYPES:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a, b = torch.randn(n, n, dtype=torch_dtype), torch.randn(n, n, dtype=torch_dtype)
        seconds = median_seconds(lambda: a @ b, repeats=_repeats(sizes, "gemm", 10), warmup=2)  # noqa: B023
        out.append({"dtype": dtype, "n": n, "gflops_per_s": 2 * n**3 / seconds / 1e9})
    return out


BF16_PAYS = 2.0  # bf16 GEMM at least this many times fp32 GEMM: the CPU's matrix units are worth using


def bf16_verdict(gemm: dict[str, float], train: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """This CPU's bf16 instructions (/proc/cpuinfo), both GEMM rates and what they mean for
    training's precision; with decoder_train rows, bf16 training's speed-up over fp32 (first pair)."""
    flags, speedup = cpu_bf16_flags(), gemm["bf16"] / gemm["fp32"]
    out: dict[str, Any] = {"cpu_bf16": flags, "fp32_gemm_gflops_per_s": gemm["fp32"],
                           "bf16_gemm_gflops_per_s": gemm["bf16"], "bf16_over_fp32_gemm": speedup}
    if train:
        rate = {r["dtype"]: r for r in train if (r["decoder"], r["attention"], r["grid"]) ==
                (train[0]["decoder"], train[0]["attention"], train[0]["grid"])}
        out["bf16_over_fp32_training"] = rate["bf16"]["captions_per_s"] / rate["fp32"]["captions_per_s"]
        out["bf16_training_fraction_of_gemm"] = rate["bf16"]["fraction_of_gemm"]
    if speedup >= BF16_PAYS:
        trained = (f" ({out['bf16_over_fp32_training']:.1f}x fp32 captions/s in this run)"
                   if "bf16_over_fp32_training" in out else "")
        out["why"] = (f"bf16 GEMM runs at {speedup:.1f}x fp32 on this CPU (bf16 instructions: {flags}): "
                      f"trainer.precision=bf16-mixed trains faster here{trained}; the default stays 32-true, the "
                      "one precision every CPU runs at full accuracy")
    else:
        out["why"] = (f"fp32 stays the default: bf16 GEMM runs at only {speedup:.1f}x fp32 on this CPU "
                      f"(bf16 instructions: {flags}; matrix units, AMX, would give several times fp32), too little "
                      "to pay for bf16's casts")
    return out


BF16_CAPTIONS_AGREE = 0.95  # bf16 may caption by default only where this many of its captions are fp32's


def caption_verdict(rows: list[dict[str, Any]] | str) -> dict[str, Any]:
    """What the caption section's bf16 row means for `imcap.caption`'s precision (nothing when
    the section was skipped)."""
    agree = next((r["captions_as_fp32"] for r in rows if r["captions_as_fp32"] != "-"), None) if isinstance(
        rows, list) else None
    if agree is None:
        return {}
    verdict = (f"below the {BF16_CAPTIONS_AGREE:.0%} a default needs: imcap.caption stays fp32"
               if agree < BF16_CAPTIONS_AGREE else "precision=bf16 may caption by default here")
    return {"captions_as_fp32": agree, "caption_why": f"bf16 captioning (precision=bf16) gives the fp32 caption "
                                                     f"for {agree:.0%} of the photos, {verdict}"}


def train_step(decoder: torch.nn.Module, optimizer: torch.optim.Optimizer, grid: torch.Tensor,
               tokens: torch.Tensor, dtype: str) -> None:
    """Teacher-forced forward, training's cross-entropy, backward and an optimiser step."""
    with autocast(dtype):
        logits, _ = decoder(grid, grid.mean(1), tokens[:, :-1])  # (B, T, V)
        loss = caption_cross_entropy(logits, tokens[:, 1:], Vocabulary.pad_id)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@cache
def count_prepacked_linear_flops() -> None:
    """Teach FlopCounterMode oneDNN's prepacked linear (`imcap.models.sat_kernel.PrepackedLinear`),
    as it knows mm: the Show-Attend-Tell kernel's forward runs its products through it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return

    @register_flop_formula(op)
    def flops(x_shape, w_shape, *args, **kwargs) -> int:  # x (..., K), packed w (N, K)
        return 2 * math.prod(x_shape) * w_shape[0]


def bench_decoder_train(quick: bool, gemm: dict[str, float], sizes: Sizes = Sizes()) -> list[dict[str, Any]]:
    count_prepacked_linear_flops()
    B, T, V = sizes.batch, sizes.length, sizes.vocab
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(V - 4)]])
    pairs = [("lstm", "additive")] if quick else valid_pairs()
    grids = sizes.grids[:1] if quick else sizes.grids
    out = []
    for decoder_name, attention_name in pairs:
        arch = compose_model(decoder_name, attention_name, sizes.overrides)
        for n, c in grids:
            torch.manual_seed(0)
            decoder = build_decoder(arch, vocab, c).train()
            optimizer = build_optimizer(arch, decoder)
            grid = torch.randn(B, n, c)
            tokens = torch.randint(4, V, (B, T + 1))

            with FlopCounterMode(display=False) as counter:
                train_step(decoder, optimizer, grid, tokens, "fp32")
            flops = counter.get_total_flops()
            for dtype in DTYPES:
                seconds = median_seconds(partial(train_step, decoder, optimizer, grid, tokens, dtype),
                                         repeats=_repeats(sizes, "decoder_train", 3 if quick else 5))
                gflops = flops / seconds / 1e9
                out.append({
                    "decoder": decoder_name, "attention": attention_name, "grid": f"{int(n**0.5)}x{int(n**0.5)}x{c}",
                    "dtype": dtype, "captions_per_s": B / seconds, "gflop_per_step": flops / 1e9,
                    "gflops_per_s": gflops, "fraction_of_gemm": gflops / gemm[dtype],
                    "optimizer": optimizer_name(optimizer),
                })
    return out


def bench_beam_search(quick: bool, sizes: Sizes = Sizes()) -> list[dict[str, Any]]:
    B, V = sizes.batch, sizes.vocab
    n, c = sizes.grids[0]
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(V - 4)]])
    arch = compose_model("lstm", "additive", sizes.overrides)
    torch.manual_seed(0)
    decoder = build_decoder(arch, vocab, c).eval()
    grid = torch.randn(B, n, c)
    out = []
    for beam in (3, 5):
        for dtype in DTYPES:
            def run() -> None:
                with torch.no_grad(), autocast(dtype):  # noqa: B023
                    beam_search(decoder, grid, grid.mean(1), vocab.bos_id, vocab.eos_id, vocab.pad_id,
                                beam_size=beam, max_length=sizes.length)  # noqa: B023

            seconds = median_seconds(run, repeats=_repeats(sizes, "beam_search", 3))
            out.append({"decoder": "lstm", "attention": "additive", "beam_size": beam, "dtype": dtype,
                        "batch": B, "images_per_s": B / seconds})
    return out


def bench_encoder(spec: str, image_size: int) -> torch.nn.Module:
    """A random-init encoder: `mobilenet_v2` (torchvision), `timm:convnext_nano`, `open_clip:ViT-B-32`."""
    from imcap import registry
    from imcap.models.encoders import TorchvisionEncoder

    library, _, name = spec.rpartition(":")
    if not library:
        return TorchvisionEncoder(name, weights=None, channels_last=True)
    cls = registry.get("encoder", library)
    return cls(name=name, image_size=image_size, **dict.fromkeys(cls.WEIGHT_OPTIONS))


def bench_feature_extraction(quick: bool, sizes: Sizes = Sizes()) -> list[dict[str, Any]] | str:
    """JPEG files to a fresh feature cache with `extract_features`, as training's first run does
    (decoding included; num_workers=0: a decoding thread per core, see imcap.data.features)."""
    if not SHARED.is_dir():
        return f"skipped: {SHARED} not found"
    from imcap.data.features import extract_features

    paths = sorted(str(p) for p in (SHARED / "Images").glob("*.jpg"))[: sizes.images[0] if quick else sizes.images[1]]
    encoders = sizes.encoders[: sizes.quick_encoders] if quick else sizes.encoders
    out = []
    for name in encoders:
        encoder = bench_encoder(name, sizes.image_size)
        transform = encoder.image_transform(sizes.image_size)
        fingerprint = encoder.fingerprint(repr(transform))
        for dtype in DTYPES:
            def run() -> None:
                with tempfile.TemporaryDirectory() as tmp:  # a cache miss every time
                    extract_features(encoder, paths, transform, tmp, fingerprint,  # noqa: B023
                                     batch_size=32, num_workers=0, precision=dtype)  # noqa: B023

            seconds = median_seconds(run, repeats=_repeats(sizes, "feature_extraction", 3), warmup=1)
            out.append({"encoder": name, "dtype": dtype, "images": len(paths), "image_size": sizes.image_size,
                        "grid": len(encoder(torch.zeros(1, 3, sizes.image_size, sizes.image_size))[0][0]),
                        "channels": encoder.out_channels, "images_per_s": len(paths) / seconds})
    return out


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (validation excluded)."""

    seconds: list[float] = []
    captions: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        EpochTimer.seconds.append(time.perf_counter() - self._start)
        EpochTimer.captions.append(len(trainer.train_dataloader.sampler))


def epoch_overrides(root: Path, cache_dir: Path, precision: str, extra: tuple[str, ...] = ()) -> list[str]:
    """One epoch of the default flickr8k experiment on `root`, no logger, test or early stop."""
    return [*extra,
        "data=flickr8k", f"data.root={root}", f"data.cache_dir={cache_dir}",
        "trainer.max_epochs=1", f"trainer.precision={precision}", "test=false",
        "~logger", "callbacks.progress_bar=null", "callbacks.early_stopping=null",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "+callbacks.timer._target_=imcap.bench.EpochTimer",
    ]


def bench_epoch(sizes: Sizes = Sizes()) -> list[dict[str, Any]] | str:
    """One epoch of the default captioner on the real Flickr8k subset with cached features."""
    if not SHARED.is_dir():
        return f"skipped: {SHARED} not found"
    extra = (*sizes.overrides, f"data.image_size={sizes.image_size}", "data.min_freq=1") if sizes.smoke else ()
    from imcap.train import train

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, precision in (("fp32", "32-true"), ("bf16", "bf16-mixed")):
            # the class Hydra instantiates: imcap.bench's, not __main__'s under `python -m imcap.bench`
            timer = importlib.import_module("imcap.bench").EpochTimer
            timer.seconds, timer.captions = [], []
            cfg = compose_config("train", epoch_overrides(SHARED, Path(tmp) / "features", precision, extra),
                                 Path(tmp) / dtype, Path(tmp) / "data")
            train(cfg)  # features are extracted before the epoch starts and are cached for the next dtype
            out.append({"data": "flickr8k-1k", "dtype": dtype, "epoch_s": timer.seconds[0],
                        "train_captions": timer.captions[0], "captions_per_s": timer.captions[0] / timer.seconds[0]})
    return out


def cpu_bf16_flags() -> str:
    """The CPU's bf16 instructions (/proc/cpuinfo flags amx_bf16, avx512_bf16), or "none"."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo", encoding="utf-8")
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "none"


def caption_model(checkpoint: str | None, sizes: Sizes = Sizes()):
    """`checkpoint` loaded, or the default captioner (conf/model, encoder weights not read) with
    a vocabulary and neighbour memory of the real Flickr8k-1k captions (random pooled features)."""
    import csv
    from collections import Counter

    from imcap.data.tokenizer import tokenize
    from imcap.models.captioner import Captioner, build_captioner
    from imcap.models.rerank import NeighbourMemory
    from imcap.models.search import Decoding

    if checkpoint:
        return Captioner.load(checkpoint).eval()
    by_image: dict[str, list[list[str]]] = {}
    with open(SHARED / "captions.txt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_image.setdefault(row["image"], []).append(tokenize(row["caption"]))
    counts = Counter(w for caps in by_image.values() for c in caps for w in c)
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *sorted(w for w, n in counts.items() if n >= 5)])
    cfg = compose_config("train", ["data=flickr8k", *sizes.overrides], Path(tempfile.gettempdir()))
    arch = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    captioner = build_captioner(arch, vocab, sizes.image_size, pretrained=False).eval()
    captioner.decoding = Decoding(**arch["decoding"])
    ids = [[[vocab.stoi.get(w, vocab.unk_id) for w in c] for c in caps] for caps in by_image.values()]
    captioner.memory = NeighbourMemory.build(torch.randn(len(ids), captioner.encoder.out_channels), ids)
    return captioner


def bench_caption(quick: bool, sizes: Sizes = Sizes(), checkpoint: str | None = None) -> list[dict[str, Any]] | str:
    """Photos/s from JPEG files to captions along `imcap.caption`'s path, per decoding, beside
    reading + encoding alone and the one-photo loop; ratios to both."""
    if not SHARED.is_dir():
        return f"skipped: {SHARED} not found"
    from dataclasses import replace

    from imcap.caption import caption_batches, encoded_batches

    paths = sorted((SHARED / "Images").glob("*.jpg"))[: sizes.images[0] if quick else sizes.images[1]]
    captioner = caption_model(checkpoint, sizes)
    default = captioner.decoding
    options = OmegaConf.create({"batch_size": 32, "num_workers": 1})  # conf/caption.yaml's defaults

    def skip(path: Path, reason: str) -> None:
        raise ImcapError(f"bench image {path}: {reason}")

    def encode_only(precision: str) -> Callable[[], None]:
        return lambda: [None for _ in encoded_batches(captioner, paths, options, precision, skip)]

    texts: dict[str, list[str]] = {}  # each precision's default captions, from its last pass

    def decode(decoding, precision: str = "fp32", keep: bool = False) -> Callable[[], None]:
        def captions() -> None:
            found = [c.text for _, batch in caption_batches(captioner, paths, decoding, options, precision, skip)
                     for c in batch]
            if keep:
                texts[precision] = found
        return captions

    one_photo = paths[: max(1, len(paths) // 8)]  # the slow loop on fewer photos

    def one_at_a_time() -> None:
        for path in one_photo:
            captioner.caption([path], default)

    repeats = _repeats(sizes, "caption", 1 if quick else 3)
    runs = [("encoder only", None, encode_only("fp32"), len(paths)),
            ("default", default, decode(default, keep=True), len(paths)),
            ("encoder only, precision=bf16", None, encode_only("bf16"), len(paths)),
            ("default, precision=bf16", default, decode(default, "bf16", keep=True), len(paths)),
            ("beam 3", replace(default, method="beam", beam_size=3, rerank_neighbours=0),
             decode(replace(default, method="beam", beam_size=3, rerank_neighbours=0)), len(paths)),
            ("greedy", replace(default, method="greedy"), decode(replace(default, method="greedy")), len(paths)),
            ("one photo at a time", default, one_at_a_time, len(one_photo))]
    rows = []
    for name, decoding, fn, n in runs:
        load = load_average()
        seconds = median_seconds(fn, repeats=repeats, warmup=1)
        rows.append({"run": name, "decoding": "-" if decoding is None else
                     ("greedy" if decoding.method == "greedy" else
                      f"beam {decoding.rerank_beams} + rerank {decoding.rerank_neighbours}" if decoding.reranks
                      else f"beam {decoding.beam_size}"),
                     "photos": n, "photos_per_s": n / seconds, "load_average": load})
    loop, flags = rows[-1]["photos_per_s"], cpu_bf16_flags()
    encoder = {"fp32": rows[0]["photos_per_s"], "bf16": rows[2]["photos_per_s"]}  # each precision's own pace
    agree = sum(a == b for a, b in zip(texts["fp32"], texts["bf16"])) / len(paths)
    for row in rows:
        bf16 = row["run"].endswith("precision=bf16")
        row.update(fraction_of_encoder=row["photos_per_s"] / encoder["bf16" if bf16 else "fp32"],
                   x_one_photo_loop=row["photos_per_s"] / loop,
                   captions_as_fp32=agree if bf16 and row["decoding"] != "-" else "-",
                   model=checkpoint or "untrained default", cpu_bf16=flags)
    return rows


SECTIONS = ("gemm", "decoder_train", "beam_search", "feature_extraction", "epoch", "caption", "gpu")


def run(quick: bool, sections: tuple[str, ...] = SECTIONS, sizes: Sizes = Sizes(),
        caption_checkpoint: str | None = None) -> dict[str, Any]:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ImcapError(f"unknown bench section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    torch.manual_seed(0)
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick}
    gemm = bench_gemm(quick, sizes)
    results["gemm"] = gemm
    gemm_by_dtype = {g["dtype"]: g["gflops_per_s"] for g in gemm}
    if "decoder_train" in sections:
        results["decoder_train"] = bench_decoder_train(quick, gemm_by_dtype, sizes)
    results["bf16"] = bf16_verdict(gemm_by_dtype, results.get("decoder_train"))
    if "beam_search" in sections:
        results["beam_search"] = bench_beam_search(quick, sizes)
    if "feature_extraction" in sections:
        results["feature_extraction"] = bench_feature_extraction(quick, sizes)
    if "epoch" in sections and not quick:
        results["epoch"] = bench_epoch(sizes)
    if "caption" in sections:
        results["caption"] = bench_caption(quick, sizes, caption_checkpoint)
        results["bf16"].update(caption_verdict(results["caption"]))
    if "gpu" in sections:
        from imcap.bench_gpu import bench_gpu

        results["gpu"] = bench_gpu(quick, sizes, SHARED)
    results["load_average_after"] = load_average()
    return results


def print_tables(results: dict[str, Any], console: Console) -> None:
    console.print(f"machine: {results['machine']}")
    console.print(f"load average (1, 5, 15 min): {results['machine'].get('load_average')} at the start, "
                  f"{results.get('load_average_after')} at the end")
    if "bf16" in results:
        console.print(f"bf16: {results['bf16']['why']}")
        if "caption_why" in results["bf16"]:
            console.print(f"bf16: {results['bf16']['caption_why']}")
    for section in ("gemm", *SECTIONS[1:]):
        rows = results.get(section)
        if not rows:
            continue
        if isinstance(rows, str):
            console.print(f"{section}: {rows}")
            continue
        if isinstance(rows, dict):  # gpu: a device, its GEMM rate and a table per part
            console.print(f"{section}: {rows['device']}, bf16 GEMM {rows['bf16_gemm_gflops_per_s']:.0f} GFLOP/s")
            for part in ("decoder_train", "beam", "features"):
                _print_table(f"{section} {part}", rows[part], console)
            continue
        _print_table(section, rows, console)


def _print_table(title: str, rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key, justify="right" if isinstance(rows[0][key], float | int) else "left")
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imcap.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset that finishes in under a minute")
    parser.add_argument("--output", default="bench.json", help="where to write the JSON results")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for the benchmarked models, e.g. model.optimizer.fused=false (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the bench itself")
    parser.add_argument("--encoders", help="comma-separated encoders for feature_extraction, e.g. "
                        "mobilenet_v2,timm:convnext_nano,open_clip:ViT-B-32 (default: the standard set)")
    parser.add_argument("--caption-checkpoint", help="the model of the caption section (a .ckpt or exported "
                        "folder; default: the default architecture, untrained)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    sizes = Sizes(**{**sizes.__dict__, "overrides": (*sizes.overrides, *args.override)})
    if args.encoders:
        chosen = tuple(e for e in args.encoders.split(",") if e)
        sizes = Sizes(**{**sizes.__dict__, "encoders": chosen, "quick_encoders": len(chosen)})
    start = time.perf_counter()
    results = run(args.quick, tuple(s for s in args.sections.split(",") if s), sizes, args.caption_checkpoint)
    results["overrides"] = list(args.override)
    results["wall_s"] = time.perf_counter() - start
    print_tables(results, Console(width=140))
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
