"""Composed configs: conf/ outside a Hydra app, a run's config as plain data, decoding overrides
(the `_decoding_overrides` config node, derived from the Decoding dataclass)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from imcap.atomic_files import write_text
from imcap.errors import ImcapError
from imcap.overrides import hide_base_files, is_base_file, unreadable_override

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# eval.yaml's and caption.yaml's defaults lists name this config node: `decoding.<field>: null` for
# each Decoding field (null: the checkpoint's value). It lives in Hydra's ConfigStore, built from the
# dataclass, so that a new decoding option needs no YAML edit.
DECODING_OVERRIDES = "_decoding_overrides"


def register_decoding_overrides() -> None:
    """Store the `_decoding_overrides` node in Hydra's ConfigStore (again: the same node)."""
    from dataclasses import fields

    from hydra.core.config_store import ConfigStore

    from imcap.models.search import Decoding

    ConfigStore.instance().store(name=DECODING_OVERRIDES, provider="imcap",
                                 node={"decoding": dict.fromkeys(f.name for f in fields(Decoding))})


def _names_decoding_overrides(name: str) -> bool:
    """Whether conf/<name>.yaml's defaults list names `_decoding_overrides`: only those configs pay
    for importing Decoding (torch), so the data tools' `compose_config("train")` stays light."""
    path = CONF_DIR / f"{name}.yaml"
    return path.is_file() and DECODING_OVERRIDES in (OmegaConf.load(path).get("defaults") or [])


def compose_config(name: str, overrides: Sequence[str] = (), output_dir: Path | None = None,
                   data_dir: Path | None = None) -> DictConfig:
    """conf/<name>.yaml with `overrides`, resolvable as under `@hydra.main` but composed outside
    a Hydra app (the data tools, tests, benchmarks, notebooks); nothing is written.

    `output_dir`: the run directory, with paths.root_dir/log_dir under it (None: the current
    directory is the output directory and paths stay as configured); `data_dir`: where datasets
    and feature caches go (None: as configured). A mistake in `overrides` (an unknown option or
    key, bad syntax) is an ImcapError.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    if _names_decoding_overrides(name):
        register_decoding_overrides()
    hide_base_files()  # data=bogus lists the data options, not data/_base.yaml
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:  # data=bogus, a misspelt key, bad syntax
        # the entry points' wording of bad syntax and base files
        said = "\n".join(ln for ln in str(e).split("\n") if not (ln.startswith("\t") and is_base_file(ln.strip())))
        raise ImcapError(unreadable_override(list(overrides))
                         or " ".join(said.split("Config search path")[0].split())) from e
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.output_dir = str(output_dir) if output_dir is not None else os.getcwd()
        if output_dir is not None:
            cfg.paths.root_dir = str(output_dir)
            cfg.paths.log_dir = str(Path(output_dir) / "logs")
            cfg.paths.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    HydraConfig().set_config(cfg)
    return cfg


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved run config as plain containers (Hydra's own node left out)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"source.num_images.train": 48, ...}: each value of a nested plain config under its dotted
    key (lists are values; an empty mapping has no key)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def save_config(cfg: DictConfig, path: Path) -> None:
    write_text(path, OmegaConf.to_yaml(OmegaConf.create(plain_config(cfg))))


def decoding_with_overrides(stored: dict[str, Any] | None, overrides: DictConfig | None) -> dict[str, Any]:
    """The checkpoint's decoding settings with every non-null override applied; an override of
    the wrong type (decoding.beam_size=five) is one line naming it."""
    from imcap.config_checks import check_decoding_overrides

    merged = dict(stored or {})
    if overrides:
        given = {k: v for k, v in OmegaConf.to_container(overrides).items() if v is not None}
        check_decoding_overrides(given)
        merged.update(given)
    return merged
