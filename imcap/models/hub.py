"""A captioner as a folder of weights and JSON, shareable without pickle (huggingface_hub's
ModelHubMixin layout):

    model.safetensors   the captioner's weights (encoder included)
    config.json         the architecture (registered components only), image size, decoding
    vocab.json          the vocabulary, {"itos": [...]}
    README.md           a model card: components, training data, test metrics when known

`save_pretrained` writes such a folder; `read_folder` finds one and reads its config, or downloads it from the
Hugging Face Hub by repo id (`owner/name`) with `snapshot_download`, at `revision` (a commit or
tag; without one, the newest upload, with a warning that says which commit to pin). A config.json
is checked like a checkpoint's stored config before anything is built from it (imcap.config_checks).
The model card names no local path: a path names its user.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from imcap.atomic_files import replacing, write_json, write_text
from imcap.config_checks import FORMAT, check_stored_config, check_stored_values
from imcap.errors import ImcapError
from imcap.registry import allowed_targets

WEIGHTS, CONFIG, VOCAB, CARD = "model.safetensors", "config.json", "vocab.json", "README.md"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
log = logging.getLogger(__name__)
_warned_unpinned: set[str] = set()  # repo ids fetched without a revision, warned about once


def save_pretrained(captioner: nn.Module, folder: str | Path, data: dict | None = None,
                    metrics: dict[str, float] | None = None, metrics_note: str | None = None) -> Path:
    """Write `captioner` (an imcap.models.captioner.Captioner) as a folder; `data` (the training data config) and `metrics` (this
    model's test metrics) go into the model card when given, else `metrics_note` (why not)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"imcap_format": FORMAT, "architecture": captioner.architecture,
              "image_size": captioner.image_size, "decoding": captioner.decoding.to_config()}
    check_stored_config(config, f"the model's own config ({folder / CONFIG})")  # never share what we would refuse
    with replacing(folder / WEIGHTS) as tmp:  # safetensors writes by file name: a temporary one, then renamed
        save_model(captioner, str(tmp))  # tensors shared between modules are stored once
    write_json(folder / CONFIG, config)
    captioner.vocab.save(folder / VOCAB)
    write_text(folder / CARD, model_card(config, len(captioner.vocab), data, metrics, metrics_note))
    return folder


def read_folder(source: str | Path, revision: str | None = None) -> tuple[Path, dict]:
    """The folder of `source` (downloaded for a Hub repo id) and its config.json, checked like a
    checkpoint's stored config before anything is imported or built from it;
    `imcap.models.captioner.Captioner.from_pretrained` builds the captioner."""
    folder = resolve_folder(source, revision)
    missing = [name for name in (WEIGHTS, CONFIG, VOCAB) if not (folder / name).is_file()]
    if missing:
        raise ImcapError(f"{folder} is not an imcap model folder: {', '.join(missing)} missing; "
                         "write one with `python -m imcap.export ckpt_path=... out=DIR`")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImcapError(f"cannot read {folder / CONFIG}: {e}; export the model again") from e
    origin = f"model config {folder / CONFIG}"
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), dict):
        raise ImcapError(f"{origin} has no architecture; export the model again")
    check_stored_config(config, origin)  # before anything is imported or built from it
    check_stored_values(config, origin, format_key="imcap_format")
    return folder, config


def resolve_folder(source: str | Path, revision: str | None = None) -> Path:
    """`source` itself if it is a folder; else a Hub repo id, downloaded (or found in the cache)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or not _REPO_ID.match(str(source)):
        raise ImcapError(f"model not found: {source}; pass a .ckpt file, a folder written by "
                         "`python -m imcap.export`, or a Hugging Face Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(source), revision=revision, etag_timeout=5,
                                        allow_patterns=[WEIGHTS, CONFIG, VOCAB, CARD], library_name="imcap"))
    except Exception as e:  # offline, unknown repo, no access: say what to place where
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ImcapError(
            f"cannot download model {source!r} from the Hugging Face Hub ({type(e).__name__}: {reason}); "
            f"without network, fetch it elsewhere (`hf download {source} --local-dir DIR`) and "
            f"pass the folder DIR holding {CONFIG}, {WEIGHTS} and {VOCAB}") from e
    if revision is None and str(source) not in _warned_unpinned:
        _warned_unpinned.add(str(source))
        commit = folder.name  # the cache keeps each download under snapshots/<commit>
        log.warning("Model %s was downloaded at its newest revision (commit %s), which changes whenever its "
                    "owner pushes; pin it with revision=%s", source, commit, commit)
    return folder


def plugin_modules(architecture: Any) -> list[str]:
    """The modules outside imcap whose classes `architecture` names: what a user of the model must
    pass as `plugins=[...]` (imcap.plugins) to build it."""
    if isinstance(architecture, dict):
        target = architecture.get("_target_")
        own = [target.rpartition(".")[0]] if isinstance(target, str) and not target.startswith("imcap.") else []
        return list(dict.fromkeys([*own, *(m for v in architecture.values() for m in plugin_modules(v))]))
    if isinstance(architecture, list):
        return list(dict.fromkeys(m for v in architecture for m in plugin_modules(v)))
    return []


def model_card(config: dict, vocab_size: int, data: dict | None, metrics: dict[str, float] | None,
               metrics_note: str | None = None) -> str:
    """README.md for the folder: Hub metadata, components, training data, test metrics (those of
    this model only; `metrics_note` says why there are none)."""
    names = allowed_targets()

    def component(node: Any) -> str:
        target = (node or {}).get("_target_") if isinstance(node, dict) else None
        return "none" if not target else "=".join(names.get(target, ("?", target))[1:])

    arch = config["architecture"]
    lines = ["---", "library_name: imcap", "tags:", "- image-captioning", "- imcap", "---", "",
             "# imcap captioner", "",
             "| component | choice |", "| --- | --- |"]
    for kind in ("encoder", "decoder", "attention", "embedding"):
        choice = component(arch.get(kind))
        if kind == "encoder" and isinstance(arch.get(kind), dict) and arch[kind].get("name"):
            choice = f"{choice} ({arch[kind]['name']})"
        lines.append(f"| {kind} | {choice} |")
    if int(arch.get("ensemble") or 1) > 1:
        lines.append(f"| ensemble | {arch['ensemble']} decoders, word probabilities averaged |")
    lines += [f"| vocabulary | {vocab_size} words |", f"| image size | {config['image_size']} |",
              f"| decoding | {config['decoding'].get('method')} |", "", "## Training data", ""]
    if data:  # by name: the data folder's path names the machine and user it was trained by
        source = data.get("source") or {}
        lines.append(f"Dataset: {component(source)}" + "".join(
            f", {k}={v}" for k, v in source.items() if k in ("year", "num_images")))
    else:
        lines.append("Not recorded.")
    lines += ["", "## Test metrics", ""]
    tested = {k: v for k, v in (metrics or {}).items() if k.startswith("test/")}
    if tested:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(tested.items())]
    else:
        lines.append(metrics_note or "Not recorded.")
    # components of a plugin are built only once its modules are imported: the commands name them
    plugins = plugin_modules(arch)
    python_plugins = f", plugins={json.dumps(plugins)}" if plugins else ""
    cli_plugins = f" plugins=[{','.join(plugins)}]" if plugins else ""
    lines += ["", "## Use", ""]
    if plugins:
        lines += [f"Needs the plugin modules {', '.join(f'`{m}`' for m in plugins)} installed or on PYTHONPATH.", ""]
    lines += ["```python", "from imcap.models.captioner import Captioner",
              f"captioner = Captioner.from_pretrained(\"<owner/name>\", revision=\"<commit>\"{python_plugins})"
              "  # or this folder",
              "print(captioner.caption([\"photo.jpg\"])[0].text)", "```", "",
              f"or `python -m imcap.caption ckpt_path=<owner/name> revision=<commit>{cli_plugins} 'images=[photo.jpg]'`. "
              "Pin the commit (or a tag) you tested: without `revision` the newest upload is used, which changes "
              "whenever its owner pushes.", ""]
    return "\n".join(lines)
