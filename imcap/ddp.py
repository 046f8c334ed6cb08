"""DDP under Hydra: start each child rank on its own job, not on the whole command line.

Lightning starts DDP child ranks by re-running the command line with `hydra.run.dir` set. In a
multirun that command line still holds `-m` and every sweep value, so each child would re-run
the entire sweep (a known pain point of lightning-hydra-template). imcap starts children with
the job's own overrides (sweep values already chosen) in the job's own output folder instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts DDP rank `local_rank` of the current Hydra job, and its cwd."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)  # this job's overrides, without -m or sweep lists
    command += [f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"', f"hydra.job.name=ddp_rank_{local_rank}",
                "hydra.output_subdir=null"]
    return command, get_original_cwd()


def use_job_subprocess_cmd() -> None:
    """Make Lightning's subprocess launcher start child ranks with `job_subprocess_cmd`."""
    import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
    import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher

    fabric_launcher._hydra_subprocess_cmd = job_subprocess_cmd
    pl_launcher._hydra_subprocess_cmd = job_subprocess_cmd


# set by Lightning's launcher in the launching process; left behind they would make the next
# job of a multirun believe its ranks were started externally and wait for them forever
DDP_ENVIRONMENT = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def ddp_job() -> Iterator[None]:
    """Run one Hydra job that may use DDP, then close its process group and restore the
    launcher's environment, so the next job of a multirun (same process, new child ranks)
    starts afresh instead of talking to the departed ranks."""
    saved = {k: os.environ.get(k) for k in DDP_ENVIRONMENT}
    use_job_subprocess_cmd()
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
