"""The prepared GPU check: `python -m imcap.gpu_check [--out DIR]`, in one go (about 8 minutes
at most) on a machine with CUDA; `--dry` runs the same steps on the CPU at tiny sizes (which is
what CI does: it has no GPU) and reports no figures.

1. bench: `python -m imcap.bench --quick --sections gemm,gpu` (bf16 GEMM rate, decoder
   training captions/s at B = 32 / 256, beam-5 images/s, GPU JPEG -> ResNet-101 features);
2. syncs: each decoder's teacher-forced forward and backward (lengths on the host, as
   `CaptionModule` passes them) under `torch.cuda.set_sync_debug_mode("warn")`: the host
   synchronisations counted (0 expected), and beam search with `check_every=0` (1 expected:
   the final step count);
3. train: `python -m imcap.train trainer=gpu debug=fast_dev_run` on the demo data (bf16, batch
   256, length buckets, `model.compile={mode: reduce-overhead}`);
4. ddp: the same with `trainer.strategy=ddp trainer.devices=2` on two GPUs (NCCL); with one
   GPU, two gloo CPU processes instead (the launch path only), and the table says so.

Each step runs in its own process with its own time limit; the table at the end gives each
step's status and time, and the bench's figures come from its JSON (`DIR/bench.json`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from imcap.atomic_files import write_json

# tiny demo data and model: the train and ddp steps check that the recipe runs, not its speed
SMALL = ["data.source.num_images={train:64,val:16,test:16}", "data.source.image_size=64", "trainer.max_epochs=1",
         "model.decoder.hidden_dim=64", "++model.attention.attention_dim=32", "model.embedding.dim=32",
         "trainer.enable_progress_bar=false", "model.test_metrics=[BLEU,CIDEr-D]", "test=false"]
LIMITS = {"bench": 240, "syncs": 60, "train": 90, "ddp": 90}  # seconds: 8 minutes in all
DRY_LIMIT = 600  # per step on a (shared, loaded) CPU


def sync_counts(device: str, pairs: list[tuple[str, str]] | None = None) -> dict[str, int]:
    """Host synchronisations per decoder pair (teacher forcing, forward + backward) and for
    beam search; on CUDA counted by the sync debug mode, elsewhere the code runs uncounted (-1)."""
    from imcap.bench import compose_model
    from imcap.data.vocab import Vocabulary
    from imcap.models.captioner import build_decoder
    from imcap.models.decoder import valid_pairs
    from imcap.models.search import beam_search

    cuda = device == "cuda"
    B, T, V, n, c = (256, 20, 10_000, 49, 2048) if cuda else (4, 6, 50, 4, 8)
    vocab = Vocabulary(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(V - 4)]])
    overrides = [] if cuda else ["model.decoder.hidden_dim=16", "model.embedding.dim=8"]  # attention follows hidden
    lengths = torch.randint(2, T + 1, (B,), generator=torch.Generator().manual_seed(0))  # on the host

    def counted(fn) -> int:
        if not cuda:
            fn()
            return -1
        fn()  # warm-up: lazy initialisation may synchronise once
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    out = {}
    for decoder_name, attention_name in pairs or valid_pairs():
        torch.manual_seed(0)
        decoder = build_decoder(compose_model(decoder_name, attention_name, overrides), vocab, c).to(device).train()
        grid = torch.randn(B, n, c, device=device)
        tokens = torch.randint(4, V, (B, T), device=device)

        def step() -> None:
            logits, _ = decoder(grid, grid.mean(1), tokens, lengths)  # noqa: B023
            logits.float().square().mean().backward()

        out[f"{decoder_name}-{attention_name}"] = counted(step)
    decoder.eval()

    def search() -> None:
        with torch.no_grad():
            beam_search(decoder, grid, grid.mean(1), vocab.bos_id, vocab.eos_id, vocab.pad_id, beam_size=5,
                        max_length=T, check_every=0)

    out["beam5 (check_every=0)"] = counted(search)
    return out


def _step(name: str, cmd: list[str], cwd: Path, limit: int) -> dict:
    start = time.monotonic()
    log = cwd / f"{name}.log"
    try:
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        status = "ok" if rc == 0 else f"failed (exit {rc}; {log})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit} s ({log})"
    return {"step": name, "status": status, "seconds": round(time.monotonic() - start, 1)}


def run(out: Path, dry: bool) -> list[dict]:
    """Every step; returns the table's rows."""
    out.mkdir(parents=True, exist_ok=True)
    limits = {k: DRY_LIMIT for k in LIMITS} if dry else LIMITS
    py = [sys.executable, "-m"]
    gpus = torch.cuda.device_count() if not dry else 0
    cpu = ["trainer.accelerator=cpu", "trainer.precision=32-true", "model.compile=false"] if dry else []
    rows = [_step("bench", [*py, "imcap.bench", "--sections", "gemm,gpu", "--output", str(out / "bench.json"),
                           *(["--smoke"] if dry else ["--quick"])], out, limits["bench"])]
    rows.append(_step("syncs", [*py, "imcap.gpu_check", "--syncs", str(out / "syncs.json"),
                                *(["--dry"] if dry else [])], out, limits["syncs"]))
    train = [*py, "imcap.train", "trainer=gpu", "debug=fast_dev_run", *SMALL, *cpu]
    rows.append(_step("train", [*train, f"hydra.run.dir={out / 'train'}"], out, limits["train"]))
    ddp = ["trainer.strategy=ddp", "trainer.devices=2"] + ([] if gpus >= 2 else
                                                          ["trainer.accelerator=cpu", "trainer.precision=32-true",
                                                           "model.compile=false"])
    row = _step("ddp", [*train, *ddp, f"hydra.run.dir={out / 'ddp'}"], out, limits["ddp"])
    row["step"] = "ddp (2 GPUs, nccl)" if gpus >= 2 else "ddp (2 CPU processes, gloo: fewer than 2 GPUs)"
    rows.append(row)
    return rows


def figures(out: Path) -> list[str]:
    """The bench's and the sync check's results as lines (none on a dry run)."""
    lines = []
    bench = out / "bench.json"
    gpu = json.loads(bench.read_text(encoding="utf-8")).get("gpu") if bench.is_file() else None
    if isinstance(gpu, dict):
        lines.append(f"device: {gpu['device']}, bf16 GEMM {gpu['bf16_gemm_gflops_per_s']:.0f} GFLOP/s")
        lines += [f"train {r['decoder']}-{r['attention']} B={r['batch']}: {r['captions_per_s']:.0f} captions/s "
                  f"({r['fraction_of_bf16_gemm']:.1%} of GEMM)" for r in gpu["decoder_train"]]
        lines += [f"beam 5, batch {r['batch']}: {r['images_per_s']:.0f} images/s" for r in gpu["beam"]]
        lines += [f"features {r['encoder']} ({r['source']}): {r['images_per_s']:.0f} images/s" for r in gpu["features"]]
    elif gpu:
        lines.append(f"bench gpu section: {gpu}")
    syncs = out / "syncs.json"
    if syncs.is_file():
        counts = json.loads(syncs.read_text(encoding="utf-8"))
        if all(v < 0 for v in counts.values()):
            lines.append(f"syncs: code ran for {len(counts)} checks, not counted (no CUDA sync debug mode)")
        else:
            lines += [f"host syncs, {k}: {v}" for k, v in counts.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imcap.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check", help="folder for logs, bench.json and syncs.json")
    parser.add_argument("--dry", action="store_true", help="the same steps on the CPU at tiny sizes; no figures")
    parser.add_argument("--syncs", metavar="JSON", help=argparse.SUPPRESS)  # step 2, in its own process
    args = parser.parse_args(argv)
    if args.syncs:
        write_json(Path(args.syncs), sync_counts("cpu" if args.dry else "cuda"))
        return 0
    if not args.dry and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run on a GPU machine, "
              "or add --dry to check the steps on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    rows = run(out, args.dry)
    print(f"{'step':<48} {'status':<12} seconds")
    for r in rows:
        print(f"{r['step']:<48} {r['status']:<12} {r['seconds']}")
    print("\n".join(figures(out)) or "no figures")
    if args.dry:
        print("dry run on the CPU: the steps ran at tiny sizes; there are no GPU figures")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
