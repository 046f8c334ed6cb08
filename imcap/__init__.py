"""imcap: image-captioning experiments on PyTorch Lightning and Hydra."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${imcap_cwd:}` in conf/paths: the directory a command runs from. Unlike `${hydra:runtime.cwd}`
# it resolves before Hydra's runtime exists (the multirun sweeper resolves its folder early).
OmegaConf.register_new_resolver("imcap_cwd", os.getcwd, replace=True)
