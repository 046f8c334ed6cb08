"""imcap: image-captioning experiments on PyTorch Lightning and Hydra."""

import os

from omegaconf import DictConfig, OmegaConf

__version__ = "0.1.0"

# `${imcap_cwd:}` in conf/paths: the directory a command runs from. Unlike `${hydra:runtime.cwd}`
# it resolves before Hydra's runtime exists (the multirun sweeper resolves its folder early).
OmegaConf.register_new_resolver("imcap_cwd", os.getcwd, replace=True)


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


# `${imcap_mkdir:DIR}`: DIR, created if missing (the Optuna sweeper opens its sqlite file in
# logs/ before any job has created that folder).
OmegaConf.register_new_resolver("imcap_mkdir", _mkdir, replace=True)


def _run_stamp() -> str:
    from imcap.atomic_files import run_stamp

    return run_stamp()


# `${imcap_run_stamp:}` in conf/hydra: a run directory's name, start time + a random part (cached
# like Hydra's `now`, so every job of a sweep and every read of the config see one value).
OmegaConf.register_new_resolver("imcap_run_stamp", _run_stamp, use_cache=True, replace=True)


def _attentions_for(decoder_target: str, _root_: "DictConfig | None" = None) -> str:
    from hydra.utils import get_class

    from imcap.models.decoder import attentions_for
    from imcap.plugins import load_plugins

    load_plugins((_root_ or {}).get("plugins"))  # the sweeper lists before the task loads them
    return ",".join(attentions_for(get_class(decoder_target)))


# `${imcap_attentions:${model.decoder._target_}}`: the model/attention options that decoder
# accepts, comma-separated for a sweeper (conf/hparams_search/attention_variants.yaml), derived
# from the registry instead of listed by hand.
OmegaConf.register_new_resolver("imcap_attentions", _attentions_for, replace=True)
