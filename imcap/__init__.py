"""imcap: image-captioning experiments on PyTorch Lightning and Hydra."""

import os

from omegaconf import OmegaConf

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
