"""Evaluate a checkpoint: `python -m imcap.eval ckpt_path=... [data=NAME] [split=test|val]`.

Rebuilds model and vocabulary from the checkpoint alone and, without `data=...`, the data it
was trained on; decodes the split as the checkpoint was trained to (greedy or beam search; the
`decoding.*` overrides change that) and reports the coco-caption metrics in `metrics`. Writes
metrics.json and predictions/<split>.json into its own run directory. With the same decoding,
the metrics equal the ones the training run reported for the same checkpoint. An option the
config alone shows wrong (a metric name, `gallery`, a `decoding.*` type, a missing checkpoint) is
refused before any checkpoint is read (`check_options`).

`ckpt_path=[a.ckpt,b.ckpt,...]` evaluates the ensemble of separately trained checkpoints (e.g.
other seeds of one recipe): their decoders' word probabilities are averaged at every step
(`imcap.models.ensemble`). They must share the vocabulary and the encoder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from imcap.atomic_files import write_json
from imcap.config_compose import decoding_with_overrides, save_config
from imcap.data.vocab import Vocabulary
from imcap.ddp import ddp_job
from imcap.entry import hydra_entry
from imcap.errors import ImcapError
from imcap.metrics.coco import chosen_metrics
from imcap.models.captioner import (
    CHECKPOINT_KEY,
    checkpoint_file,
    checkpoint_list,
    join_ensemble,
    load_checkpoint,
    load_state,
)
from imcap.models.search import Decoding
from imcap.trainer_setup import build_trainer, scalar_metrics
from imcap.training.module import CaptionModule
from imcap.viz.gallery import write_gallery

log = logging.getLogger("imcap.eval")


def check_options(cfg: DictConfig) -> tuple[list[str], tuple[str, ...]]:
    """Refuse what the config alone shows to be wrong, each with the one line of its own check;
    returns the checkpoint paths (several: their ensemble) and the metric names. No file is read."""
    if cfg.split not in ("val", "test"):
        raise ImcapError(f"split={cfg.split!r}; choose val or test")
    metrics = chosen_metrics(OmegaConf.to_object(cfg.metrics) if OmegaConf.is_config(cfg.metrics) else cfg.metrics)
    decoding_with_overrides(None, cfg.get("decoding"))  # each decoding.* override's type
    gallery = cfg.get("gallery")
    if gallery is not None and (isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 0):
        raise ImcapError(f"gallery={gallery!r}; give the number of images to show (0: no gallery)")
    paths = checkpoint_list(cfg.ckpt_path)
    for path in paths:  # the third of an ensemble missing fails now, not after the first is loaded
        checkpoint_file(path)
    return paths, metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    # a mistyped option fails before a checkpoint is loaded or the data built
    (first, *others), metric_names = check_options(cfg)
    checkpoint = load_checkpoint(first)
    meta = checkpoint[CHECKPOINT_KEY]
    given = cfg.get("data") or OmegaConf.create({})
    # data=NAME chooses a whole data option; data.* keys alone (data.num_workers=0, or trainer=gpu's
    # batch sizes) change the checkpoint's own
    data_cfg = given if "_target_" in given else OmegaConf.merge(meta.get("data") or {}, given)
    if "_target_" not in data_cfg:
        raise ImcapError(f"checkpoint {first} stores no data config; pass data=NAME")
    # the overrides' values with the checkpoint's (decoding.min_length above its max_length), before data
    decoding = Decoding(**decoding_with_overrides(meta.get("decoding"), cfg.get("decoding")))
    run_dir = Path(cfg.paths.output_dir)
    # its own options (devices, precision) refused before the data is built; after the checkpoint
    # is read, so that a bad checkpoint's one line is not preceded by Lightning's device report
    trainer = build_trainer(cfg, callbacks=[], loggers=[])

    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    vocab = datamodule.build_vocab(Vocabulary(meta["vocab"]))
    module = CaptionModule(
        architecture=meta["architecture"],
        vocab=vocab.itos,
        image_size=meta["image_size"],
        optimizer={},
        pretrained=False,  # the checkpoint holds every weight
        decoding=decoding.to_config(),
        data_config=OmegaConf.to_container(data_cfg, resolve=True),
        eval_prefix=cfg.split,
        test_metrics=list(metric_names),
    )
    load_state(module, checkpoint["state_dict"], first)
    if others:
        join_ensemble(module.captioner, others, first)
        log.info("Evaluating the ensemble of %d checkpoints (%d decoders)", 1 + len(others),
                 len(module.captioner.decoder.members))
    datamodule.attach_encoder(module.captioner.encoder)
    datamodule.eval_split = cfg.split

    results = trainer.test(module, datamodule=datamodule)
    metrics = scalar_metrics(results[0] if results else {})
    if not trainer.is_global_zero:  # DDP: rank 0 writes; every rank holds the gathered results
        return metrics
    save_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "predictions" / f"{cfg.split}.json", module.predictions)
    if cfg.get("gallery"):
        gallery = write_gallery(datamodule.records[cfg.split], module.predictions[: cfg.gallery],
                                run_dir / "gallery.html", title=f"{' + '.join([first, *others])} — {cfg.split}")
        log.info("Gallery of %d images: %s", min(cfg.gallery, len(module.predictions)), gallery)
    for name, value in metrics.items():
        log.info("%s = %.4f", name, value)
    log.info("Run directory: %s", run_dir)
    return metrics


@hydra_entry("eval")
def main(cfg: DictConfig) -> None:
    with ddp_job():
        evaluate(cfg)


if __name__ == "__main__":
    main()
