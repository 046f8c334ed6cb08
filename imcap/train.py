"""Train a captioner: `python -m imcap.train [hydra overrides]`.

Builds data and model from the composed config, fits with Lightning, tests the best checkpoint
and leaves in the run directory: checkpoints/{best,last}.ckpt, metrics.json,
predictions/test.json, vocab.json and config.yaml.
"""

from __future__ import annotations

import logging
import re
import shlex
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from imcap.atomic_files import write_json
from imcap.config_compose import flatten, plain_config, save_config
from imcap.data.vocab import Vocabulary
from imcap.ddp import ddp_job
from imcap.entry import hydra_entry
from imcap.errors import ImcapError, on_ctrl_c
from imcap.models.captioner import CHECKPOINT_KEY, COMPONENTS, load_checkpoint, load_state
from imcap.registry import allowed_targets
from imcap.trainer_setup import (
    build_trainer,
    check_devices,
    instantiate_group,
    scalar_metrics,
    trainer_choice,
)
from imcap.training.callbacks import RunInterrupted, StayEarlyStopped, StopOnSignal
from imcap.training.module import MODULE_OPTIONS, CaptionModule
from imcap.wandb_setup import configure_wandb, configure_wandb_mode, define_metrics, run_labels

log = logging.getLogger("imcap.train")



def architecture_of(model: dict) -> dict:
    """The part of a plain `model` config that a checkpoint stores as its architecture."""
    return {**{k: model.get(k) for k in COMPONENTS}, "ensemble": model.get("ensemble", 1)}


def build_module(cfg: DictConfig, vocab: Vocabulary) -> CaptionModule:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return CaptionModule(
        architecture=architecture_of(model),
        vocab=vocab.itos,
        image_size=cfg.data.image_size,
        data_config=OmegaConf.to_container(cfg.data, resolve=True),
        **{k: model[k] for k in MODULE_OPTIONS if k in model},
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint; returns the flat metrics also written to metrics.json."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    configure_wandb_mode(cfg)
    run_dir = Path(cfg.paths.output_dir)
    check_devices(cfg.trainer, trainer_choice())  # trainer=gpu without a GPU: before any data is made
    resume = load_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if resume:  # before any data is built: `ckpt_path=` alone composes the default data=shapes
        check_resume_data(resume[CHECKPOINT_KEY].get("data"), cfg, cfg.ckpt_path)
        check_resume_model(resume[CHECKPOINT_KEY].get("architecture"), cfg, cfg.ckpt_path)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    vocab = datamodule.build_vocab(Vocabulary(resume[CHECKPOINT_KEY]["vocab"]) if resume else None)
    module = build_module(cfg, vocab)
    if resume:  # what check_resume_model cannot see (an option the checkpoint predates, a word-vector
        # file of another width) fails here, in one line too
        try:
            load_state(module, resume["state_dict"], cfg.ckpt_path)
        except ImcapError as e:
            listed = options_listed(cfg.ckpt_path)
            raise ImcapError(f"{e}{f' (its run was started with the options in {listed})' if listed else ''}") from e
    datamodule.attach_encoder(module.captioner.encoder)

    configure_wandb(cfg, (resume or {}).get(CHECKPOINT_KEY, {}).get("wandb_run_id"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    stay_stopped = StayEarlyStopped()
    callbacks.append(stay_stopped)
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    for lg in loggers:
        lg.log_hyperparams({**plain_config(cfg), **run_labels(cfg)})
        if isinstance(lg, WandbLogger):
            define_metrics(lg.experiment, module.monitor)
            module.wandb_run_id = lg.version  # stored in checkpoints: a resume continues this run
    checkpoint_cb = trainer.checkpoint_callback
    if trainer.is_global_zero:  # DDP child ranks run this script too
        save_config(cfg, run_dir / "config.yaml")
        vocab.save(run_dir / "vocab.json")
        if checkpoint_cb is not None and checkpoint_cb.dirpath:
            vocab.save(Path(checkpoint_cb.dirpath) / "vocab.json")

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except RunInterrupted as stop:
        if trainer.is_global_zero:
            print(f"Interrupted by {stop} at step {stop.step} (epoch {stop.epoch}); saved {stop.checkpoint}\n"
                  f"Resume with: {resume_command(stop.checkpoint)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None  # as a shell reports a process its signal ended
    except SIGTERMException:  # Lightning ends validation at once on SIGTERM: nothing new is saved
        last = next((Path(c.path) for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)
        if trainer.is_global_zero:
            print("Terminated by SIGTERM during validation; " + (
                f"the newest checkpoint is {last.resolve()}\nResume with: {resume_command(str(last.resolve()))}"
                if last is not None and last.is_file() else "no checkpoint was saved"), file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    metrics = scalar_metrics(trainer.callback_metrics)
    if stay_stopped.resumed_stopped:  # no validation ran: the best score is the checkpoint's
        metrics[f"val/{module.monitor}_best"] = float(module.val_best.compute())

    if cfg.get("test") and not trainer.fast_dev_run:
        best = checkpoint_cb.best_model_path if checkpoint_cb is not None else ""
        if not best:
            log.warning("No best checkpoint was saved; testing the final weights")
        # training has finished: Ctrl-C from here says to evaluate what it saved (the same command would train again)
        saved = best or next((c.best_model_path for c in trainer.checkpoint_callbacks if c.best_model_path), "")
        with on_ctrl_c(evaluate_advice(saved)):
            results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
            metrics.update(scalar_metrics(results[0] if results else {}))
            if trainer.is_global_zero:
                write_json(run_dir / "predictions" / "test.json", module.predictions)
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()  # the next job of a multirun starts its own W&B run
    log.info("Run directory: %s", run_dir)
    for name in ("val/CIDEr-D_best", "test/BLEU-4", "test/CIDEr-D", "test/METEOR", "test/grounding"):
        if name in metrics:
            log.info("%s = %.4f", name, metrics[name])
    return metrics


# data options that say where the data is or how fast it is read, not what is trained on: a resume
# may change them (another IMCAP_ROOT or machine, more workers)
NOT_WHAT_IS_TRAINED_ON = ("root", "source.root", "cache_dir", "remote_cache_dir", "storage_options",
                          "num_workers", "pin_memory", "eval_batch_size", "features", "feature_precision")


def check_resume_data(stored: dict | None, cfg: DictConfig, checkpoint: str) -> None:
    """Refuse in one line to resume `checkpoint` on other data than it was trained on (`stored`, its
    data options), naming the options to repeat. Its run's .hydra/overrides.yaml is named, never read:
    which options a run takes is the user's command line's to say, not a file's beside a checkpoint."""
    if not isinstance(stored, dict):
        return  # written before checkpoints held their data options
    given = OmegaConf.to_container(cfg.data, resolve=True)
    listed = options_listed(checkpoint)
    rest = f", and the others listed in {listed}" if listed else ""
    theirs, ours = data_option(stored), data_option(given)
    if theirs != ours:
        raise ImcapError(f"checkpoint {checkpoint} was trained on data={theirs}, and this command gives data={ours}; "
                         f"resume with the options of the run that wrote it (data={theirs}{rest}) and the same ckpt_path")
    old, new = flatten(stored), flatten(given)
    differ = changed_options(old, new, NOT_WHAT_IS_TRAINED_ON)
    if differ:
        shown = "; ".join(f"data.{k}={_override(old[k])} there, {_override(new[k])} here" for k in differ[:3])
        repeat = " ".join(f"data.{k}={_override(old[k])}" for k in differ)
        raise ImcapError(f"checkpoint {checkpoint} was trained on other data options than this command gives "
                         f"({shown}{'; ...' if len(differ) > 3 else ''}); resume with the options of the run "
                         f"that wrote it ({repeat}{rest}) and the same ckpt_path")


# model options (under model.) that a checkpoint's architecture holds but a resume may change: they
# shape no weight and no input. Dropout is how training goes; the others say where a file is (the
# checkpoint's weights replace what it holds) or how memory is laid out. Not here: finetune,
# finetune_last_k and embedding.freeze: they change the optimiser's parameter groups, whose state a
# resume restores (torch refuses it for other groups). The model's options outside its architecture
# (optimizer, scheduler, decoding, scst, scheduled_sampling, label_smoothing, feature_dropout,
# compile, ...) are not compared.
NOT_THE_ARCHITECTURE = ("decoder.dropout", "encoder.channels_last", "encoder.weights_path", "embedding.path")


def check_resume_model(stored: dict | None, cfg: DictConfig, checkpoint: str) -> None:
    """Refuse in one line to resume `checkpoint` into another model than it holds (`stored`, its
    architecture), naming the options to repeat, before any data is made: the weights would not
    fit it, or (another number of heads) fit and train something else."""
    if not isinstance(stored, dict):
        return
    old = {**stored, "ensemble": stored.get("ensemble", 1)}  # written before ensembles: one model
    new = architecture_of(OmegaConf.to_container(cfg.model, resolve=True))
    switched = [c for c in COMPONENTS if isinstance(old.get(c), dict) and isinstance(new.get(c), dict)
                and old[c].get("_target_") != new[c].get("_target_")]
    shown = [f"model/{c}={component_option(old[c])} there, {component_option(new[c])} here" for c in switched]
    repeat = [f"model/{c}={component_option(old[c])}" for c in switched]
    inside = tuple(f"{c}." for c in switched)  # another component's options are not compared
    flat_old, flat_new = flatten(old), flatten(new)
    for k in changed_options(flat_old, flat_new, NOT_THE_ARCHITECTURE):
        if not k.startswith(inside):
            shown.append(f"model.{k}={_override(flat_old[k])} there, {_override(flat_new[k])} here")
            repeat.append(f"model.{k}={_override(flat_old[k])}")
    if shown:
        listed = options_listed(checkpoint)
        rest = f", and the others listed in {listed}" if listed else ""
        raise ImcapError(f"checkpoint {checkpoint} holds another model than this command asks for "
                         f"({'; '.join(shown[:3])}{'; ...' if len(shown) > 3 else ''}); resume with the options of "
                         f"the run that wrote it ({' '.join(repeat)}{rest}) and the same ckpt_path, or start a new "
                         "run without ckpt_path")


def changed_options(old: dict, new: dict, may_change: tuple[str, ...]) -> list[str]:
    """The dotted keys of both `old` and `new` whose values differ, except those `may_change` names
    and the keys inside one (storage_options.s3....)."""
    below = tuple(f"{k}." for k in may_change)
    return [k for k in old if k in new and old[k] != new[k] and k not in may_change and not k.startswith(below)]


def component_option(component: dict) -> str:
    """The registered name a component config's `_target_` has (`none` for no attention), else the
    `_target_` as written."""
    target = component.get("_target_")
    return "none" if target is None else (allowed_targets().get(target) or (None, str(target)))[1]


def options_listed(checkpoint: str) -> Path | None:
    """The file listing the options of the run that wrote `checkpoint` (<run>/.hydra/overrides.yaml,
    which Hydra writes in every run directory), or None where there is none."""
    listed = Path(checkpoint).resolve().parent.parent / ".hydra" / "overrides.yaml"
    return listed if listed.is_file() else None


def data_option(data: dict) -> str:
    """The `data=` option a data config came from: its source's registered name (its datamodule's
    where it has no source, as data=shards), else the `_target_` as written."""
    source = data.get("source")
    target = source.get("_target_") if isinstance(source, dict) else data.get("_target_")
    return (allowed_targets().get(target) or (None, str(target)))[1]


def _override(value: object) -> str:
    """`value` as a command line override writes it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_override(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_override(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[\w./-]+", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def evaluate_advice(checkpoint: str) -> str:
    """What Ctrl-C while testing says: training has finished, so evaluate the checkpoint it saved."""
    if not checkpoint:
        return "training finished but saved no checkpoint to evaluate"
    return "training finished; evaluate it with: " + shlex.join(["python", "-m", "imcap.eval", f"ckpt_path={checkpoint}"])


def resume_command(checkpoint: str) -> str:
    """This run's command line (its job's own overrides, without a sweep) resuming from `checkpoint`."""
    from hydra.core.hydra_config import HydraConfig

    sweep = ("ckpt_path=", "hparams_search=", "hydra/sweeper=", "hydra/launcher=", "hydra.mode=")
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(sweep)]
    return shlex.join(["python", "-m", "imcap.train", *overrides, f"ckpt_path={checkpoint}"])


@hydra_entry("train")
def main(cfg: DictConfig) -> float | None:
    with ddp_job():  # DDP child ranks run this job, not the whole sweep again
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
