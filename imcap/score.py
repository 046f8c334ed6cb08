"""Score caption predictions with the official COCO metrics:
`python -m imcap.score --references REFS --predictions PREDS [--metrics BLEU CIDEr-D ...]`.

REFS is a COCO captions file ({"annotations": [{"image_id", "caption"}, ...]}, with an optional
"images" list) or a flat {"image_id": ["ref", ...]} object; PREDS is a COCO results file
([{"image_id", "caption"}, ...]) with exactly one caption for every image of REFS. Prints one JSON
object: by default BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and SPICE where it can run) on
coco-caption's scales; `--metrics` chooses among every registered metric (imcap.metrics.coco), an
installed plugin's included, and those of the modules `--plugins` imports (as `plugins=[...]` does
for training).

Image ids are compared as text, so 42 and "42" are the same image: a flat REFS file can only have
string keys, while COCO results files usually carry integers. Ids must be integers or strings.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imcap.data import text_files
from imcap.errors import ImcapError, report_user_errors
from imcap.metrics.java import MeteorScorer
from imcap.plugins import load_plugins


def load_json(path: Path, option: str) -> Any:
    """The JSON document in `path`; a problem is one line naming the file and the option."""
    try:
        return text_files.load_json(path)
    except ImcapError as e:
        raise ImcapError(f"{e} (given as {option})") from None


def image_key(value: Any, path: Path, where: str) -> str:
    """An image id as text (42 and "42" match); anything but an int or a string is an error."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise ImcapError(f"{path}: {where}: image_id must be an integer or a string, got {value!r}")


def _caption(value: Any, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise ImcapError(f"{path}: {where}: caption must be a string, got {value!r}")
    return value


def _entry(item: Any, path: Path, where: str) -> tuple[str, str]:
    if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
        raise ImcapError(f"{path}: {where} must be an object with image_id and caption, got {item!r:.80}")
    return image_key(item["image_id"], path, where), _caption(item["caption"], path, where)


def load_references(path: Path) -> dict[str, list[str]]:
    """{image key: [reference captions]} from a COCO captions file or a flat mapping."""
    data = load_json(path, "--references")
    refs: dict[str, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        if not isinstance(data["annotations"], list):
            raise ImcapError(f"{path}: 'annotations' must be a list of {{image_id, caption}} objects")
        images = data.get("images")
        if images is not None:
            if not isinstance(images, list) or not all(isinstance(i, dict) and "id" in i for i in images):
                raise ImcapError(f"{path}: 'images' must be a list of objects with an 'id'")
            refs = {image_key(i["id"], path, "images"): [] for i in images}
        for n, item in enumerate(data["annotations"]):
            key, caption = _entry(item, path, f"annotations[{n}]")
            if images is not None and key not in refs:
                raise ImcapError(f"{path}: annotations[{n}] is for image {key}, which 'images' does not list")
            refs.setdefault(key, []).append(caption)
        empty = [k for k, v in refs.items() if not v]
        if empty:
            raise ImcapError(f"{path}: {len(empty)} images listed in 'images' have no caption "
                             f"(e.g. {', '.join(empty[:3])}); every image needs a reference")
    elif isinstance(data, dict):
        for raw, captions in data.items():
            if not isinstance(captions, list) or not captions:
                raise ImcapError(f"{path}: image {raw}: expected a non-empty list of reference captions")
            refs[image_key(raw, path, f"image {raw}")] = [
                _caption(c, path, f"image {raw}") for c in captions]
    else:
        raise ImcapError(f"{path}: expected a COCO captions file ({{\"annotations\": [...]}}) "
                         f"or an object {{image_id: [captions]}}, got a JSON {type(data).__name__}")
    if not refs:
        raise ImcapError(f"{path}: no reference captions")
    return refs


def load_predictions(path: Path, refs: dict[str, list[str]], refs_path: Path) -> dict[str, str]:
    """{image key: predicted caption}, one for each image of `refs` and no other."""
    data = load_json(path, "--predictions")
    if not isinstance(data, list):
        raise ImcapError(f"{path}: expected a COCO results list [{{image_id, caption}}, ...], "
                         f"got a JSON {type(data).__name__}")
    preds: dict[str, str] = {}
    first: dict[str, int] = {}
    for n, item in enumerate(data):
        key, caption = _entry(item, path, f"entry {n}")
        if key in preds:
            raise ImcapError(f"{path}: image {key} has two predictions (entries {first[key]} and {n}); "
                             "keep one caption per image")
        preds[key], first[key] = caption, n
    unknown = [k for k in preds if k not in refs]
    if unknown:
        raise ImcapError(f"{path}: {len(unknown)} predictions are for images that {refs_path} does "
                         f"not have (e.g. {', '.join(unknown[:3])})")
    missing = [k for k in refs if k not in preds]
    if missing:
        raise ImcapError(f"{path}: no prediction for {len(missing)} of the {len(refs)} images in "
                         f"{refs_path} (e.g. {', '.join(missing[:3])})")
    return preds


def score(references: Path, predictions: Path, metrics: Sequence[str] | None = None) -> dict[str, float]:
    """The chosen metrics (by default coco-caption's) of `predictions` against `references`, as
    printed by the CLI."""
    refs = load_references(references)
    preds = load_predictions(predictions, refs, references)
    meteor = MeteorScorer()
    if (metrics is None or "METEOR" in metrics) and meteor.available():
        meteor.start()  # Java reads its paraphrase table while torch loads
    from imcap.metrics.coco import CaptionMetrics

    metric = CaptionMetrics(metrics=metrics, meteor=meteor)
    keys = list(refs)
    metric.update(keys, [preds[k] for k in keys], [refs[k] for k in keys])
    return {name: float(value) for name, value in metric.compute().items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # --plugins is read first: the modules it names register metrics that --metrics then offers
    plugins = argparse.ArgumentParser(add_help=False)
    plugins.add_argument("--plugins", nargs="+", default=[], metavar="MODULE",
                         help="modules to import first, registering metrics of one's own (my_pkg.metrics)")
    load_plugins(plugins.parse_known_args(argv)[0].plugins)
    # the choices are the registry's, so a plugin's metric is offered too; reading them loads torch
    # before METEOR's Java process starts
    from imcap.metrics.coco import coco_caption_names, metric_names

    parser = argparse.ArgumentParser(parents=[plugins], prog="python -m imcap.score", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--references", required=True, type=Path, metavar="REFS",
                        help="COCO captions JSON or {image_id: [captions]}")
    parser.add_argument("--predictions", required=True, type=Path, metavar="PREDS",
                        help="COCO results JSON: [{image_id, caption}, ...]")
    parser.add_argument("--metrics", nargs="+", choices=metric_names(), default=coco_caption_names(),
                        help="which metrics to compute (default: coco-caption's, %(default)s; "
                             "BLEU gives BLEU-1..4)")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="note: %(message)s")  # METEOR/SPICE skips
    scores = score(args.references, args.predictions, args.metrics)
    print(json.dumps(scores, indent=2))
    return scores


if __name__ == "__main__":
    main()
