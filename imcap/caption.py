"""Caption new images: `python -m imcap.caption ckpt_path=... 'images=[a.jpg,b.jpg]'`.

`ckpt_path` is a training checkpoint (.ckpt), a folder written by `python -m imcap.export`, or
the Hugging Face Hub repo id of such a folder. `images` may name folders.

Results stream out as each batch finishes: `<image>\\t<caption>` lines on stdout and one JSON
object per image ({"image", "caption", "attention_plot" when drawn}) appended to
`<output stem>.jsonl` and flushed, so a stopped run keeps what it did. At the end the same
objects are written as a JSON list to `output` (in the order of `images`).

Files that cannot be captioned never stop the run: a zero-byte, corrupt or unreadable file, a
path that vanished, and a file in a format Pillow cannot decode here (HEIC, camera raw, AVIF
without libavif: "format not supported (convert to JPEG/PNG)") are skipped, each with a
one-line reason on stderr and in `<output stem>.skipped.jsonl` (and `.skipped.json` at the
end). The run ends with `captioned N, skipped M`, and exits with status 2 if M > 0. Files in a folder whose suffix is
neither an image's nor an unsupported image format's (notes, videos, sidecars) are not captioned
and not counted: one log line names how many and the first few.

Resume: a run that was stopped (Ctrl-C, kill -9, a crash) is continued by the same command. An
image is done when its absolute path (relative paths taken from the directory the command runs
in; symlinks not followed) has a line in the JSONL; only the others are captioned. With the
default `output` (in the run's own directory) the newest unfinished run of the same checkpoint,
images, decoding and precision under logs/caption/runs/ is continued; with `output=PATH`, that
file's JSONL is. Skipped files are tried again. A run that skipped nothing is finished, and the
same command then starts a new run.

Speed: images are read and decoded by `num_workers` DataLoader processes, encoded in batches by
training's feature-extraction encoder (`imcap.data.features.inference_encoder`: BatchNorm folded,
channels-last, `precision=bf16` optional), and each batch is decoded by one batched beam search
with consensus reranking scored by tensors (`imcap.models.rerank.consensus_scores`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, ListConfig
from PIL import features
from torch.utils.data import DataLoader, Dataset

from imcap.atomic_files import write_json
from imcap.config_compose import decoding_with_overrides
from imcap.data.features import PRECISIONS, ImageFiles, inference_encoder
from imcap.data.images import load_image
from imcap.entry import hydra_entry
from imcap.errors import ImcapError
from imcap.models.captioner import Caption, Captioner
from imcap.models.search import Decoding

log = logging.getLogger("imcap.caption")
# AVIF where this Pillow decodes it (Pillow >= 11.2 built with libavif)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff",
                  *((".avif",) if features.check("avif") else ())}
# image formats phones and cameras write that this Pillow does not decode: listed, never ignored
UNSUPPORTED_SUFFIXES = {".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf",
                        ".orf", ".rw2", ".psd", ".svg"} - IMAGE_SUFFIXES
UNSUPPORTED = "format not supported (convert to JPEG/PNG)"


class ImageList(NamedTuple):
    images: list[Path]  # to caption, in order
    unsupported: list[Path]  # image formats that cannot be decoded: skipped with UNSUPPORTED
    ignored: list[Path]  # files in folders that are not images by their suffix


def list_images(images: str | Sequence[str]) -> ImageList:
    """Files and folders -> what to caption (a folder contributes its images, sorted), what is
    skipped as an unsupported format, and what in the folders is not an image."""
    items = [images] if isinstance(images, str) else list(images)
    found = ImageList([], [], [])
    for item in items:
        p = Path(str(item))
        if p.is_dir():
            for q in sorted(p.iterdir()):
                suffix = q.suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    found.images.append(q)  # a dangling link too: skipped with its reason when read
                elif suffix in UNSUPPORTED_SUFFIXES:
                    found.unsupported.append(q)
                elif not q.is_dir():
                    found.ignored.append(q)
        elif p.is_file():
            (found.unsupported if p.suffix.lower() in UNSUPPORTED_SUFFIXES else found.images).append(p)
        else:
            raise ImcapError(f"image not found: {p}; pass existing files or folders in images=[...]")
    if not found.images and not found.unsupported:
        raise ImcapError(f"no images found in images={items}")
    return found


def expand_images(images: str | list[str]) -> list[Path]:
    """Image paths from files and folders (a folder contributes its images, sorted)."""
    return list_images(images).images


class Readable(Dataset):
    """(index, pixels, None) for each image `ImageFiles` can read, (index, None, reason) for the
    others: a bad file is a reason, not an exception that ends the DataLoader."""

    def __init__(self, paths: Sequence[Path], transform):
        self.files = ImageFiles([str(p) for p in paths], transform)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.files[i], None
        except ImcapError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - whatever a decoder raises for one file skips that file
            return i, None, f"cannot read image {self.files.paths[i]}: {type(e).__name__}: {e}"


class Batch(NamedTuple):
    indices: list[int]  # of the readable images, in `pixels` order
    pixels: torch.Tensor | None  # (B, 3, H, W)
    failures: list[tuple[int, str]]  # (index, reason)


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    return Batch([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
                 [(i, reason) for i, x, reason in items if x is None])


def absolute(path: str | Path) -> str:
    """The key of an image in the outputs: its absolute path, symlinks not followed."""
    return os.path.abspath(str(path))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file; a last line cut short by a kill is dropped, and the
    file truncated to the lines that are whole, so that appending continues it cleanly."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    entries, good = [], 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("cut short")
            entries.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if good < len(data):
        log.warning("Dropping the last, unfinished line of %s (the run was stopped while writing it)", path)
        with open(path, "r+b") as f:
            f.truncate(good)
    return entries


class Outputs:
    """Where a run's results go: `output` (JSON list, at the end) and beside it the streamed
    `.jsonl`, the `.skipped.jsonl`/`.skipped.json` and the `.run.json` that says which command
    wrote them and whether it finished."""

    def __init__(self, output: Path):
        self.json = output
        self.jsonl = output.with_suffix(".jsonl")
        self.skipped_jsonl = output.with_name(output.stem + ".skipped.jsonl")
        self.skipped_json = output.with_name(output.stem + ".skipped.json")
        self.state = output.with_name(output.stem + ".run.json")
        self.plots = output.parent / "attention"


def run_directory() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return None


def resume_output(output: Path, command: dict[str, Any]) -> Path:
    """The output file to write: `output`, or where the default output lies in this run's own
    directory, the output of the newest unfinished run of the same `command` beside it."""
    if output.with_suffix(".jsonl").is_file():
        return output
    here = run_directory()
    if here is None or output.parent.resolve() != here.resolve():
        return output
    states = sorted(here.parent.glob(f"*/{Outputs(output).state.name}"), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    for state in states:
        try:
            previous = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if previous.get("command") == command and not previous.get("finished"):
            log.info("Continuing the stopped run in %s (same checkpoint, images and decoding)", state.parent)
            return state.parent / output.name
    return output


def caption_images(cfg: DictConfig) -> list[tuple[Path, Caption]]:
    """Caption cfg.images with cfg.ckpt_path, streaming results to the outputs (module docstring);
    returns this run's (image, caption) pairs. An ImcapError at the end if any file was skipped."""
    images = cfg.images
    found = list_images([str(i) for i in images] if isinstance(images, ListConfig) else str(images))
    precision = str(cfg.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise ImcapError(f"precision={precision!r}; choose one of {list(PRECISIONS)}")
    device = torch.device(cfg.device)
    captioner = Captioner.load(cfg.ckpt_path, map_location=device,  # .ckpt, folder or repo id (at a revision)
                               revision=cfg.get("revision")).to(device).eval()
    decoding = Decoding(**decoding_with_overrides(asdict(captioner.decoding), cfg.get("decoding")))

    checkpoints = cfg.ckpt_path if isinstance(cfg.ckpt_path, ListConfig) else [cfg.ckpt_path]
    command = {"ckpt_path": [absolute(c) if Path(str(c)).exists() else str(c) for c in checkpoints],
               "images": [absolute(i) for i in (images if isinstance(images, ListConfig) else [images])],
               "decoding": decoding.to_config(), "precision": precision}
    out = Outputs(resume_output(Path(cfg.output), command))
    out.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.state, {"command": command, "finished": False})
    done = {absolute(e["image"]) for e in read_jsonl(out.jsonl) if "image" in e}
    if done:
        log.info("%d of the images are captioned already in %s; captioning the others", len(done), out.jsonl)
    if found.ignored:
        names = ", ".join(p.name for p in found.ignored[:5]) + (" ..." if len(found.ignored) > 5 else "")
        log.warning("Not captioned: %d file(s) in the folders without an image suffix (%s)", len(found.ignored),
                    names)
    todo = [p for p in found.images if absolute(p) not in done]
    positions = {absolute(p): i for i, p in enumerate(found.images, 1)}
    plot_names = plot_file_names(found.images)

    results: list[tuple[Path, Caption]] = []
    skipped = 0
    with open(out.jsonl, "a", encoding="utf-8") as captions_file, \
            open(out.skipped_jsonl, "w", encoding="utf-8") as skipped_file:  # skipped files are tried again

        def skip(path: Path, reason: str) -> None:
            nonlocal skipped
            skipped += 1
            print(f"skipped {path}: {reason}", file=sys.stderr, flush=True)
            skipped_file.write(json.dumps({"image": absolute(path), "reason": reason}, ensure_ascii=False) + "\n")
            skipped_file.flush()

        for path in found.unsupported:
            skip(path, UNSUPPORTED)
        plots = bool(cfg.attention_plots)
        try:
            for paths, captions in caption_batches(captioner, todo, decoding, cfg, precision, skip):
                lines = []
                for path, cap in zip(paths, captions):
                    entry = {"image": absolute(path), "caption": cap.text}
                    if plots and cap.attention is None:
                        log.warning("This model has no attention (model/attention=none): no attention plots")
                        plots = False
                    if plots and cap.words:
                        from imcap.viz.attention import plot_caption_attention

                        plot = out.plots / plot_names[positions[absolute(path)] - 1]
                        plot_caption_attention(load_image(str(path)), cap.words, cap.attention, plot)
                        entry["attention_plot"] = str(plot)
                    lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
                    results.append((path, cap))
                # one write per batch, before stdout: a kill leaves whole batches (or a cut last line)
                captions_file.write("".join(lines))
                captions_file.flush()
                for path, cap in zip(paths, captions):
                    print(f"{path}\t{cap.text}", flush=True)
        except KeyboardInterrupt:
            raise ImcapError(f"stopped (interrupted) with {len(read_jsonl(out.jsonl))} of {len(found.images)} images "
                             f"captioned in {out.jsonl}; run the same command again to continue") from None

    entries = {absolute(e["image"]): e for e in read_jsonl(out.jsonl)}
    order = sorted(entries, key=lambda k: positions.get(k, len(positions) + 1))
    write_json(out.json, [entries[k] for k in order])
    write_json(out.skipped_json, read_jsonl(out.skipped_jsonl))
    write_json(out.state, {"command": command, "finished": skipped == 0})
    if cfg.attention_plots and plots:
        log.info("Wrote attention plots to %s", out.plots)
    log.info("Wrote %s and %s", out.json, out.jsonl)
    summary = f"captioned {len(entries)}, skipped {skipped}"
    if skipped:
        raise ImcapError(f"{summary}: the reasons are in {out.skipped_json}; fix or remove those files and run the "
                         "same command again to caption them")
    print(summary, file=sys.stderr, flush=True)
    return results


def caption_batches(captioner: Captioner, paths: list[Path], decoding: Decoding, cfg: DictConfig, precision: str,
                    skip: Callable[[Path, str], None]) -> Iterator[tuple[list[Path], list[Caption]]]:
    """(paths, captions) per batch of `paths`, as each batch is decoded (one batched search,
    reranking included); unreadable files go to `skip(path, reason)`."""
    for batch_paths, grid, pooled in encoded_batches(captioner, paths, cfg, precision, skip):
        with torch.no_grad():
            yield batch_paths, captioner.to_captions(captioner.generate(grid, pooled, decoding))


def encoded_batches(captioner: Captioner, paths: list[Path], cfg: DictConfig, precision: str,
                    skip: Callable[[Path, str], None]) -> Iterator[tuple[list[Path], torch.Tensor, torch.Tensor]]:
    """(paths, grid (B, N, C), pooled (B, C)) per batch of the readable `paths`: files read and
    decoded by cfg.num_workers DataLoader processes, encoded by a copy of the encoder as feature
    extraction runs it (`inference_encoder`), in `precision`; features returned in fp32."""
    if not paths:
        return
    device = next(captioner.parameters()).device
    encoder = inference_encoder(captioner.encoder, precision, device)
    in_dtype = next((p.dtype for p in encoder.parameters() if p.is_floating_point()), torch.float32)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=in_dtype != PRECISIONS[precision])
    # a few images per encoder call on CPU, as feature extraction does (its activations stay in cache)
    rows = max(1, 16 // in_dtype.itemsize) if device.type == "cpu" else int(cfg.batch_size)
    loader = DataLoader(Readable(paths, captioner.encoder.image_transform(captioner.image_size)),
                        batch_size=int(cfg.batch_size), num_workers=int(cfg.get("num_workers", 0)),
                        collate_fn=collate, pin_memory=device.type == "cuda")
    for batch in loader:
        for i, reason in batch.failures:
            skip(paths[i], reason)
        if batch.pixels is None:
            continue
        pixels = batch.pixels.to(device, in_dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast:
            encoded = [encoder(part) for part in pixels.split(rows)]
        grid = torch.cat([g for g, _ in encoded]).float()  # (B, N, C)
        pooled = torch.cat([p for _, p in encoded]).float()  # (B, C)
        yield [paths[i] for i in batch.indices], grid, pooled


def plot_file_names(paths: list[Path]) -> list[str]:
    """One file name per image, unique even when images in different folders share a name
    (a/x.jpg and b/x.jpg): `<position>-<stem>.png`, in the order of the captions."""
    width = len(str(len(paths)))
    return [f"{i:0{width}d}-{p.stem}.png" for i, p in enumerate(paths, 1)]


@hydra_entry("caption")
def main(cfg: DictConfig) -> None:
    caption_images(cfg)


if __name__ == "__main__":
    # run as imcap.caption, not __main__: the DataLoader workers pickle this module's classes
    from imcap.caption import main as caption_main

    caption_main()
