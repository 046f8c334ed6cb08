"""Caption new images: `python -m imcap.caption ckpt_path=... 'images=[a.jpg,b.jpg]'`.

`ckpt_path` is a training checkpoint (.ckpt), a folder written by `python -m imcap.export`, or
the Hugging Face Hub repo id of such a folder. `images` may name folders: the images in them
and in their subfolders are captioned, sorted by path; hidden subfolders (.git, .thumbnails) are
not searched, and a folder reached twice (a link to a parent) is searched once.

Results stream out as each batch finishes: `<image>\\t<caption>` lines on stdout and one JSON
object per image ({"image", "caption", "attention_plot" when drawn}) appended to
`<output stem>.jsonl` and flushed, so a stopped run keeps what it did. At the end the same
objects are written as a JSON list to `output` (in the order of `images`).

Files that cannot be captioned never stop the run: a zero-byte, corrupt or unreadable file, a
path that vanished, a HEIC/HEIF photo without a HEIF reader (pi-heif) installed, and a file in a format
Pillow cannot decode here (camera raw, AVIF without libavif: "format not supported (convert to
JPEG/PNG)") are skipped, each with a
one-line reason on stderr and in `<output stem>.skipped.jsonl` (and `.skipped.json` at the
end). The run ends with `captioned N, skipped M`, and exits with status 2 if M > 0. Files in a folder whose suffix is
neither an image's nor an unsupported image format's (notes, videos, sidecars) are not captioned
and not counted: one log line names how many and the first few.

Resume: a run that was stopped (Ctrl-C: exit status 130, SIGTERM: 143, each with one line
saying how many are captioned; kill -9; a crash) is continued by the same command: the same
model (its weights, whatever path they are read from: `model_fingerprint`), images, decoding,
precision and attention_plots. An image is done when its absolute path (relative paths taken
from the directory the command runs in; symlinks not followed) has a line in the JSONL; only the
others are captioned. With the default `output` (in the run's own directory) the newest
unfinished run of the same command under logs/caption/runs/ is continued, this run logs to its
caption.log and leaves no directory of its own; with `output=PATH`, that file's JSONL is. Skipped
files are tried again. A run that skipped nothing is finished, and the same command then starts
a new run (with `output=PATH`: writes the same files again).

An output holds one command's results: one that another command wrote (another model, images,
decoding, precision or attention_plots; or no record of its command) is refused in one line
saying what differs, never merged or overwritten. While a run writes an output it holds a lock
on its JSONL (flock, dropped by the OS however the run ends): a second run on the same output
is refused in one line instead of captioning the same images again.

Speed: images are read and decoded by `num_workers` DataLoader processes, encoded in batches by
training's feature-extraction encoder (`imcap.data.features.inference_encoder`: BatchNorm folded,
channels-last, `precision=bf16` optional), and each batch is decoded by one batched beam search
with consensus reranking scored by tensors (`imcap.models.rerank.consensus_scores`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from omegaconf import DictConfig, ListConfig
from PIL import features
from torch.utils.data import DataLoader, Dataset

from imcap.atomic_files import write_json
from imcap.config_compose import decoding_with_overrides
from imcap.data.features import PRECISIONS, ImageFiles, inference_encoder
from imcap.data.images import load_image
from imcap.entry import hydra_entry, remove_unused_run_dir
from imcap.errors import ImcapError, Interrupted
from imcap.models.captioner import Caption, Captioner
from imcap.models.grid_encoder import weights_fingerprint
from imcap.models.search import Decoding

log = logging.getLogger("imcap.caption")
# AVIF where this Pillow decodes it (Pillow >= 11.2 built with libavif). HEIC/HEIF (iPhones; .hif:
# cameras) always: read with pi-heif, or skipped with imcap.data.images' line saying how to get it
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".hif",
                  *((".avif",) if features.check("avif") else ())}
# image formats phones and cameras write that this Pillow does not decode: listed, never ignored
UNSUPPORTED_SUFFIXES = {".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf",
                        ".orf", ".rw2", ".psd", ".svg"} - IMAGE_SUFFIXES
UNSUPPORTED = "format not supported (convert to JPEG/PNG)"


class ImageList(NamedTuple):
    images: list[Path]  # to caption, in order
    unsupported: list[Path]  # image formats that cannot be decoded: skipped with UNSUPPORTED
    ignored: list[Path]  # files in folders that are not images by their suffix
    not_searched: list[tuple[Path, str]]  # subfolders not searched, each with why


def list_images(images: str | Sequence[str]) -> ImageList:
    """Files and folders -> what to caption (a folder contributes the images in it and in its
    subfolders, sorted by path), what is skipped as an unsupported format, what in the folders
    is not an image, and which subfolders were not searched."""
    items = [images] if isinstance(images, str) else list(images)
    found = ImageList([], [], [], [])
    searched: set[str] = set()  # real paths: a link back up, or a folder named twice, is searched once
    for item in items:
        p = Path(str(item))
        if p.is_dir():
            add_folder(p, found, searched)
        elif p.is_file():
            (found.unsupported if p.suffix.lower() in UNSUPPORTED_SUFFIXES else found.images).append(p)
        else:
            raise ImcapError(f"image not found: {p}; pass existing files or folders in images=[...]")
    if not found.images and not found.unsupported:
        unsearched = f" (not searched: {not_searched(found)})" if found.not_searched else ""
        raise ImcapError(f"no images found in images={items}{unsearched}")
    return found


def not_searched(found: ImageList) -> str:
    """The folders not searched, each with why: 'a/.thumbnails (hidden), ...' (the first five)."""
    named = ", ".join(f"{p} ({why})" for p, why in found.not_searched[:5])
    return named + (" ..." if len(found.not_searched) > 5 else "")


def add_folder(folder: Path, found: ImageList, searched: set[str]) -> None:
    """Add what `folder` holds to `found`, subfolders where their names sort. Links to folders
    are followed, but a folder whose real path was searched already is not searched again (a
    link to a parent would loop). Hidden subfolders (.git, .thumbnails: a viewer's copies of the
    same photos) are not searched; a hidden folder named in images=[...] is."""
    real = os.path.realpath(folder)
    if real in searched:
        found.not_searched.append((folder, "searched already"))
        return
    searched.add(real)
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:  # a subfolder this user may not list (lost+found): the others are captioned
        found.not_searched.append((folder, e.strerror or type(e).__name__))
        return
    for q in entries:
        suffix = q.suffix.lower()
        if q.is_dir():
            if q.name.startswith("."):
                found.not_searched.append((q, "hidden"))
            else:
                add_folder(q, found, searched)
        elif suffix in IMAGE_SUFFIXES:
            found.images.append(q)  # a dangling link too: skipped with its reason when read
        elif suffix in UNSUPPORTED_SUFFIXES:
            found.unsupported.append(q)
        else:
            found.ignored.append(q)


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


# what makes a run the same command as the one that wrote an output (the .run.json's "command");
# "ckpt_path" is recorded too but not compared: a copied or moved checkpoint is the same model
SAME_COMMAND = ("checkpoint", "images", "decoding", "precision", "attention_plots")


def model_fingerprint(captioner: Captioner) -> str:
    """Which model captions, whatever path or format it came from: sha256 of its image size,
    vocabulary and every tensor (`weights_fingerprint`, the feature cache's), so that a checkpoint
    or export folder replaced at the same path by another model, or a Hub repo id at a newer
    revision, is another command. One sha256 pass over the weights: about a tenth of the time
    loading them takes (a shapes-demo checkpoint, 30 MB of tensors)."""
    identity = f"image_size={captioner.image_size}|vocab=" + "\0".join(captioner.vocab.itos)
    return weights_fingerprint(identity, captioner)


def differences(previous: Any, command: dict[str, Any]) -> list[str]:
    """What in `command` differs from `previous` (the command a .run.json records), in words;
    [] for the same command. A record without a fingerprint (written before imcap recorded one)
    is another command: whether its captions came from this model cannot be told."""
    if not isinstance(previous, dict):
        return ["the command (its record is unreadable)"]
    if "checkpoint" not in previous:
        return ["checkpoint (not recorded: written by an older imcap)"]
    found = []
    for key in SAME_COMMAND:
        before, now = previous.get(key), command[key]
        if before == now:
            continue
        if key == "checkpoint":
            found.append("checkpoint (another model's weights)")
        elif key == "decoding" and isinstance(before, dict):
            found.append(f"decoding ({', '.join(k for k in {**before, **now} if before.get(k) != now.get(k))})")
        elif key == "images":
            found.append("images")
        else:
            found.append(f"{key} ({as_typed(before)} there, {as_typed(now)} here)")
    return found


def as_typed(value: Any) -> str:
    """A value as it is written on the command line (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


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
        if isinstance(previous, dict) and not previous.get("finished") and not differences(previous.get("command"),
                                                                                            command):
            return state.parent / output.name
    return output


def log_also_in(folder: Path) -> None:
    """From here on, log also to the log file of the run in `folder` (the run this one
    continues, where its results go): this run's own directory is removed at its end."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            also = logging.FileHandler(folder / Path(handler.baseFilename).name, encoding="utf-8")
            also.setFormatter(handler.formatter)
            also.setLevel(handler.level)
            root.addHandler(also)
            return


@contextlib.contextmanager
def writing(out: Outputs, command: dict[str, Any]) -> Iterator[IO[str]]:
    """The output's .jsonl, open for appending, while this process holds an exclusive lock on it
    (flock: the OS drops it however the process ends, kill -9 too), and after checking that the
    output holds nothing but results of `command`. A second imcap.caption writing the same
    output, or another command's results there, is an ImcapError: never merged, never overwritten."""
    existed = out.jsonl.exists()
    stream = open(out.jsonl, "a", encoding="utf-8")
    try:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ImcapError(f"another imcap.caption is writing {out.json} (it holds the lock on {out.jsonl}); "
                             "wait for it to end, or give another output=PATH") from None
        try:
            refuse_another_command(out, command)
        except ImcapError:
            if not existed:  # made by the open above: leave the folder as it was
                out.jsonl.unlink(missing_ok=True)
            raise
        write_json(out.state, {"command": command, "finished": False})
        yield stream
    finally:
        stream.close()


def refuse_another_command(out: Outputs, command: dict[str, Any]) -> None:
    """An ImcapError if `out` holds results that another command wrote (module docstring)."""
    try:
        previous = json.loads(out.state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if out.json.is_file() or out.jsonl.stat().st_size > 0:
            raise ImcapError(f"output {out.json} holds results without the record of the command that wrote them "
                             f"({out.state.name}); give another output=PATH, or delete {out.json.stem}.* in "
                             f"{out.json.parent} to caption anew") from None
        return
    except (OSError, ValueError):
        previous = None
    differ = differences(previous.get("command") if isinstance(previous, dict) else None, command)
    if differ:
        raise ImcapError(f"output {out.json} holds the captions of another command (not the same: "
                         f"{', '.join(differ)}); give another output=PATH, or delete {out.json.stem}.* in "
                         f"{out.json.parent} to caption anew")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, docker stop) while captioning: stops as Ctrl-C does, with exit
    status 128 + `signum` (imcap.errors.report_user_errors reads it)."""

    signum = signal.SIGTERM


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM while captioning (in the main thread, the one that receives
    signals). Once batches stream (`batches_started`), the batch in progress is finished and written
    first: stopped at once, the main process could be receiving a batch's tensors from a
    DataLoader worker, which then prints a traceback of its own. A second signal stops at once;
    before the first batch, the first does."""

    def __init__(self) -> None:
        self.batches_started = False
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def on_signal(self, signum: int, frame: object) -> None:
        if self.received is not None or not self.batches_started:
            self.stop(signum)
        self.received = signum
        # os.write: a buffered stream written to from a signal handler may be mid-write already
        os.write(2, b"\nStopping after this batch" + (b" (Ctrl-C again to stop at once)\n"
                                                      if signum == signal.SIGINT else b"\n"))

    def after_batch(self) -> None:
        """Stop here if a signal came while the batch was captioned."""
        if self.received is not None:
            self.stop(self.received)

    @staticmethod
    def stop(signum: int) -> None:
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def workers_leave_signals_to_main(worker_id: int) -> None:
    """A DataLoader worker's start: Ctrl-C and SIGTERM sent to the whole process group (a
    terminal, systemd) leave the worker to the main process, which finishes its batch and then
    ends the workers (`StopSignals`); a worker ended first would leave it waiting for a batch that
    never comes. A worker whose main process died (kill -9) ends by itself within 5 s (torch's
    watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def caption_images(cfg: DictConfig) -> list[tuple[Path, Caption]]:
    """Caption cfg.images with cfg.ckpt_path, streaming results to the outputs (module docstring);
    returns this run's (image, caption) pairs. An ImcapError at the end if any file was skipped."""
    with StopSignals() as stops:
        return _caption_images(cfg, stops)


def _caption_images(cfg: DictConfig, stops: StopSignals) -> list[tuple[Path, Caption]]:
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
    command = {"checkpoint": model_fingerprint(captioner),
               "ckpt_path": [absolute(c) if Path(str(c)).exists() else str(c) for c in checkpoints],
               "images": [absolute(i) for i in (images if isinstance(images, ListConfig) else [images])],
               "decoding": decoding.to_config(), "precision": precision,
               "attention_plots": bool(cfg.attention_plots)}  # plots of some images and not others: not one output
    here = run_directory()
    out = Outputs(resume_output(Path(cfg.output), command))
    # a run that continues another's directory leaves none of its own (its log went there too)
    continued = here is not None and out.json.parent.resolve() != Path(cfg.output).parent.resolve()
    out.json.parent.mkdir(parents=True, exist_ok=True)
    with writing(out, command) as captions_file:
        if continued:
            log_also_in(out.json.parent)
            log.info("Continuing the stopped run in %s (the same model, images, decoding, precision and "
                     "attention_plots)", out.json.parent)
        results = caption_into(out, captions_file, found, captioner, decoding, cfg, precision, command, stops)
    if continued:
        remove_unused_run_dir()
    return results


def caption_into(out: Outputs, captions_file: IO[str], found: ImageList, captioner: Captioner, decoding: Decoding,
                 cfg: DictConfig, precision: str, command: dict[str, Any],
                 stops: StopSignals) -> list[tuple[Path, Caption]]:
    """Caption what `out` does not hold yet, appending to `captions_file` (its locked .jsonl),
    then write the JSON files; an ImcapError at the end if any file was skipped."""
    done = {absolute(e["image"]) for e in read_jsonl(out.jsonl) if "image" in e}
    if done:
        log.info("%d of the images are captioned already in %s; captioning the others", len(done), out.jsonl)
    if found.ignored:
        names = ", ".join(p.name for p in found.ignored[:5]) + (" ..." if len(found.ignored) > 5 else "")
        log.warning("Not captioned: %d file(s) in the folders without an image suffix (%s)", len(found.ignored),
                    names)
    if found.not_searched:
        log.warning("Folders not searched for images: %s", not_searched(found))
    todo = [p for p in found.images if absolute(p) not in done]
    positions = {absolute(p): i for i, p in enumerate(found.images, 1)}
    plot_names = plot_file_names(found.images)

    results: list[tuple[Path, Caption]] = []
    skipped = 0
    with open(out.skipped_jsonl, "w", encoding="utf-8") as skipped_file:  # skipped files are tried again

        def skip(path: Path, reason: str) -> None:
            nonlocal skipped
            skipped += 1
            print(f"skipped {path}: {reason}", file=sys.stderr, flush=True)
            skipped_file.write(json.dumps({"image": absolute(path), "reason": reason}, ensure_ascii=False) + "\n")
            skipped_file.flush()

        for path in found.unsupported:
            skip(path, UNSUPPORTED)
        plots = bool(cfg.attention_plots)
        batches = caption_batches(captioner, todo, decoding, cfg, precision, skip)
        stops.batches_started = True
        try:
            for paths, captions in batches:
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
                stops.after_batch()
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated): what is written stays
            batches.close()  # its DataLoader workers end now, not when the interpreter does
            stopped = Interrupted(f"{len(read_jsonl(out.jsonl))} of {len(found.images)} images captioned in "
                                  f"{out.jsonl}; run the same command again to continue")
            stopped.signum = getattr(stop, "signum", signal.SIGINT)  # exit status 128 + signum
            raise stopped from None

    entries = {absolute(e["image"]): e for e in read_jsonl(out.jsonl)}
    order = sorted(entries, key=lambda k: positions.get(k, len(positions) + 1))
    write_json(out.json, [entries[k] for k in order])
    write_json(out.skipped_json, read_jsonl(out.skipped_jsonl))
    write_json(out.state, {"command": command, "finished": skipped == 0})
    if cfg.attention_plots and plots:  # those of earlier runs of this command too: attention_plots is part of it
        log.info("Attention plots are in %s", out.plots)
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
                        collate_fn=collate, pin_memory=device.type == "cuda", worker_init_fn=workers_leave_signals_to_main)
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
