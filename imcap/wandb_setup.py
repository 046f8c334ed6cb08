"""W&B as its users run it: online whenever wandb has credentials, runs named after what a
sweep varies, the Hydra choices as top-level config keys, best-value summaries for val metrics.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from imcap.errors import ImcapError
from imcap.metrics.coco import metric_keys
from imcap.registry import allowed_targets

log = logging.getLogger("imcap")

# top-level config key <- Hydra config group, so W&B can group runs and draw parallel coordinates
CHOICE_KEYS = {"dataset": "data", "encoder": "model/encoder", "decoder": "model/decoder",
               "attention": "model/attention", "embedding": "model/embedding"}
STEP_METRIC = "trainer/global_step"  # Lightning's step axis for every metric it logs


def wandb_loggers(cfg: DictConfig) -> list[DictConfig]:
    return [node for node in (cfg.get("logger") or {}).values()
            if isinstance(node, DictConfig) and "WandbLogger" in str(node.get("_target_", ""))]


def configure_wandb_mode(cfg: DictConfig) -> str | None:
    """Decide online or offline before the logger starts, and say why in one log line.

    Online when wandb itself finds credentials for its server (WANDB_API_KEY, an identity
    token file, the ~/.netrc entry that `wandb login` writes, its settings files), looked up
    by wandb's own `authenticate_session` (what `wandb.init` and `wandb.login` call) without
    a prompt and without a request to the server (`wandb.login` would ask it for the user
    name). Offline when there are none (then the loggers get `mode: offline`), or when the
    user asks (WANDB_MODE, logger.wandb.offline=true). Returns the mode, or None when the run does not log to W&B.
    """
    nodes = wandb_loggers(cfg)
    if not nodes:
        return None
    if os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"]
        log.info("W&B runs %s: WANDB_MODE=%s is set", mode, mode)
        return mode
    if all(node.get("offline") for node in nodes):
        log.info("W&B runs offline: logger.wandb.offline=true (upload later with `wandb sync`)")
        return "offline"
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings  # environment + settings files; starts no service
    try:  # wandb's own lookup, as wandb.init does it, minus the prompt and the server round trip
        credentials = wbauth.authenticate_session(host=settings.base_url, source="imcap", prompt=False,
                                                  update_session=False)
    except AuthenticationError as e:  # a key in a malformed format, e.g. a truncated paste
        raise ImcapError(f"W&B credentials are unusable ({e}); run `wandb login --relogin`, "
                         "or set WANDB_MODE=offline to log offline") from e
    if credentials is not None:
        log.info("W&B runs online: wandb found credentials for %s (WANDB_API_KEY, ~/.netrc or its settings)",
                 settings.base_url)
        return "online"
    for node in nodes:  # wandb.init's own argument: wandb has read its environment by now
        with open_dict(node):
            node.mode = "offline"
    log.info("W&B runs offline: wandb found no credentials (no WANDB_API_KEY, no `wandb login` "
             "entry in ~/.netrc); run `wandb login`, then upload with `wandb sync <run dir>/wandb/offline-run-*`")
    return "offline"


def _hydra() -> DictConfig | None:
    try:
        return HydraConfig.get()
    except ValueError:  # composed without Hydra's runtime
        return None


def run_labels(cfg: DictConfig) -> dict[str, str]:
    """The Hydra choice of each component group (`attention: additive`), or, without Hydra's
    runtime, the registered name of the component the config builds."""
    hydra_cfg = _hydra()
    choices = dict(hydra_cfg.runtime.choices) if hydra_cfg is not None else {}
    nodes = {"dataset": cfg.data.get("source"), "encoder": cfg.model.encoder, "decoder": cfg.model.decoder,
             "attention": cfg.model.get("attention"), "embedding": cfg.model.get("embedding")}

    def from_target(node: Any) -> str:
        target = (node or {}).get("_target_")
        if not target:
            return "none"
        if node.get("name"):  # one encoder class serves many backbones, named in the config
            return str(node.name)
        return allowed_targets().get(target, ("", target.rsplit(".", 1)[-1].lower()))[1]

    return {key: str(choices.get(group) or from_target(nodes[key])) for key, group in CHOICE_KEYS.items()}


def sweep_group() -> str | None:
    """The sweep folder's name for a multirun job (one W&B group per sweep)."""
    hydra_cfg = _hydra()
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.sweep.dir).name
    return None


def swept_keys(hydra_cfg: DictConfig) -> set[str]:
    """Override keys that take several values in this sweep: the sweeper's `params` and the
    command line's comma lists (read back from the multirun.yaml Hydra writes at the start)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set((hydra_cfg.sweeper.get("params") or {}).keys())
    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        arguments = list(OmegaConf.load(saved).hydra.overrides.task)
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(arguments)
                 if o.is_sweep_override()}
    return keys


def sweep_run_name() -> str | None:
    """`attention=multihead,seed=1`: this job's values of what the sweep varies (a config
    group by its last part), or None outside a multirun."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = _hydra()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    swept = swept_keys(hydra_cfg)
    parts = []
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if key in swept:
            parts.append(f"{key.rsplit('/', 1)[-1]}={override.value()}")
    return ",".join(parts) or None


def configure_wandb(cfg: DictConfig, resume_id: str | None = None) -> None:
    """Name, group, tags and run id of each W&B logger, derived from the run: a multirun lands
    in one group (its sweep folder) with one readable name per job; a run resumed from a
    checkpoint continues the W&B run `resume_id` stored in it."""
    for node in wandb_loggers(cfg):
        with open_dict(node):
            if not node.get("group"):
                node.group = sweep_group() or cfg.task_name
            if not node.get("name"):
                node.name = sweep_run_name()
            node.tags = sorted({*(node.get("tags") or []), *run_labels(cfg).values()})
            if resume_id:
                node.id, node.resume = resume_id, "allow"


def define_metrics(experiment: Any, monitor: str) -> None:
    """Best-value summaries, so W&B's runs table shows each val metric's best epoch rather than
    its last: max for the caption metrics, min for the loss."""
    for key in (*metric_keys(), f"{monitor}_best"):
        experiment.define_metric(f"val/{key}", step_metric=STEP_METRIC, summary="max")
    for key in ("val/loss", "train/loss"):
        experiment.define_metric(key, step_metric=STEP_METRIC, summary="min")
