"""The GPU section of `python -m imcap.bench` (`--sections gpu`); runs only where CUDA is.

- gemm: the device's own bf16 matrix-multiply rate (8192^3, or 2048^3 with --quick);
- decoder_train: one training step (forward, backward, fused AdamW) under bf16 autocast of
  each decoder x attention pair (--quick: lstm x additive) on 7x7x2048 grids at B = 32, 256 and
  1024: captions/s, and the fraction of the measured bf16 GEMM rate (FLOPs counted op by op);
- beam: beam-5 search of the LSTM decoder, images/s at batch 256;
- features: JPEG bytes -> `torchvision.io.decode_jpeg(device="cuda")` -> resize -> ResNet-101
  grid features in bf16, images/s (the ../shared Flickr8k photos, or synthetic 500x375 JPEGs).

Every time is the median of repeated runs after a warm-up, each ended by a device synchronise.
Each part takes `device`, so that a CPU test runs its code at tiny sizes (numbers meaningless).
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

NO_CUDA = "skipped: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine"
BATCHES = (32, 256, 1024)


def device_seconds(fn: Callable[[], Any], repeats: int, device: str = "cuda", warmup: int = 2) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(quick: bool, device: str = "cuda", n: int | None = None) -> float:
    """bf16 GFLOP/s of a square matrix product on the device."""
    n = n or (2048 if quick else 8192)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / device_seconds(lambda: a @ b, repeats=10, device=device) / 1e9


def train_step(decoder: torch.nn.Module, optimizer: torch.optim.Optimizer, grid: torch.Tensor,
               tokens: torch.Tensor, device: str = "cuda") -> None:
    """Teacher-forced forward and training's loss under bf16 autocast, backward, a step."""
    from imcap.data.vocab import Vocabulary
    from imcap.training.losses import caption_cross_entropy

    with torch.autocast(device, dtype=torch.bfloat16):
        logits, _ = decoder(grid, grid.mean(1), tokens[:, :-1])  # (B, T, V)
        loss = caption_cross_entropy(logits, tokens[:, 1:], Vocabulary.pad_id)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def decoder_train(quick: bool, gemm: float, sizes, device: str = "cuda",
                  batches: tuple[int, ...] = BATCHES) -> list[dict[str, Any]]:
    from imcap.bench_models import build_optimizer, compose_model, optimizer_name
    from imcap.data.vocab import Vocabulary
    from imcap.models.captioner import build_decoder
    from imcap.models.decoder import valid_pairs

    T, V = sizes.length, sizes.vocab
    n, c = sizes.grids[0]
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(V - 4)]])
    out = []
    for decoder_name, attention_name in [("lstm", "additive")] if quick else valid_pairs():
        arch = compose_model(decoder_name, attention_name, sizes.overrides)
        torch.manual_seed(0)
        decoder = build_decoder(arch, vocab, c).to(device).train()
        optimizer = build_optimizer(arch, decoder)
        for batch in (batches[:2] if quick else batches):
            grid = torch.randn(batch, n, c, device=device)
            tokens = torch.randint(4, V, (batch, T + 1), device=device)

            step = partial(train_step, decoder, optimizer, grid, tokens, device)

            with FlopCounterMode(display=False) as counter:
                step()
            seconds = device_seconds(step, repeats=3 if quick else 10, device=device)
            out.append({"decoder": decoder_name, "attention": attention_name, "grid": f"7x7x{c}", "batch": batch,
                        "captions_per_s": batch / seconds,
                        "fraction_of_bf16_gemm": counter.get_total_flops() / seconds / 1e9 / gemm,
                        "optimizer": optimizer_name(optimizer)})
    return out


def beam(quick: bool, sizes, device: str = "cuda", batch: int = 256) -> list[dict[str, Any]]:
    from imcap.bench_models import compose_model
    from imcap.data.vocab import Vocabulary
    from imcap.models.captioner import build_decoder
    from imcap.models.search import beam_search

    n, c = sizes.grids[0]
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(sizes.vocab - 4)]])
    decoder = build_decoder(compose_model("lstm", "additive", sizes.overrides), vocab, c).to(device).eval()
    grid = torch.randn(batch, n, c, device=device)

    def run() -> None:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            beam_search(decoder, grid, grid.mean(1), vocab.bos_id, vocab.eos_id, vocab.pad_id, beam_size=5,
                        max_length=sizes.length)

    seconds = device_seconds(run, repeats=3 if quick else 5, device=device, warmup=1)
    return [{"decoder": "lstm", "attention": "additive", "beam_size": 5, "batch": batch, "images_per_s": batch / seconds}]


def jpeg_files(shared: Path, count: int) -> list[bytes]:
    files = sorted((shared / "Images").glob("*.jpg"))[:count] if shared.is_dir() else []
    if files:
        return [p.read_bytes() for p in files]
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (375, 500, 3), generator=gen, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def features(quick: bool, shared: Path, device: str = "cuda", count: int | None = None,
             size: int = 224) -> list[dict[str, Any]]:
    from torchvision.io import decode_jpeg
    from torchvision.models import resnet101
    from torchvision.transforms.v2 import functional as F

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpeg_files(shared, count or (64 if quick else 512))]
    trunk = torch.nn.Sequential(*list(resnet101(weights=None).children())[:-2]).to(device).eval()
    trunk = trunk.to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    batch = 128

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(data), batch):
                images = decode_jpeg(data[start:start + batch], device=device)  # list of (3, H, W) uint8
                x = torch.stack([F.resize(im, [size, size], antialias=True) for im in images]).float().div_(255)
                x = ((x - mean) / std).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
                trunk(x).flatten(2).transpose(1, 2)  # (B, 49, 2048)

    seconds = device_seconds(run, repeats=3, device=device, warmup=1)
    return [{"encoder": "resnet101", "decode": f"decode_jpeg(device={device})", "dtype": "bf16", "images": len(data),
             "source": "flickr8k-1k" if shared.is_dir() else "synthetic 500x375", "images_per_s": len(data) / seconds}]


def bench_gpu(quick: bool, sizes, shared: Path) -> dict[str, Any] | str:
    """All GPU figures, or the line saying why there are none."""
    if not torch.cuda.is_available():
        return NO_CUDA
    gemm = gemm_rate(quick)
    return {"device": torch.cuda.get_device_name(0), "bf16_gemm_gflops_per_s": gemm,
            "decoder_train": decoder_train(quick, gemm, sizes), "beam": beam(quick, sizes),
            "features": features(quick, shared)}
