"""What a run prints, and the one place where library noise a user cannot act on is silenced.

A first `make train` shows what is being prepared, the progress bars, the model summary, the
metrics and where the run went. Each message below came from a library on such a run, and none
asks the user for anything; each is named here with the reason it is noise in imcap, so a
message that starts to matter can be let through again by deleting one entry. Everything else
(a warning of imcap's own, or any other library warning) still shows.

`quiet_libraries()` is called once by every Hydra entry point (imcap.entry), before anything is
built; it is idempotent.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

# (start of the message, why it is noise here). Matched with warnings.filterwarnings, which
# compares the start of the message (a regular expression).
SILENCED_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"Checkpoint directory .* exists and is not empty",
     "every run directory is new; the file already in checkpoints/ is the run's own vocab.json, "
     "written beside the checkpoints before the first one"),
    (r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a "
     r"`LightningDataModule`",
     "CaptionModule copies batches itself (non-blocking, host lengths kept); the datamodule "
     "has no such hook, so there is nothing to choose between"),
)

# Lightning's INFO lines advertising its cloud products ("💡 Tip: For seamless cloud logging
# ...", "... cloud uploads and versioning ..."): nothing a run here can use.
SILENCED_INFO_PREFIXES: tuple[str, ...] = ("💡 Tip",)
_LIGHTNING_INFO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                           "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropPrefixes(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


_DROP_TIPS = _DropPrefixes(SILENCED_INFO_PREFIXES)


def quiet_libraries() -> None:
    """Silences the messages named in this module, and only those (safe to call twice)."""
    for message, _why in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in _LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_TIPS not in logger.filters:
            logger.addFilter(_DROP_TIPS)
    _summary_without_uncounted_flops()


def _summary_without_uncounted_flops() -> None:
    """Lightning's rich model summary prints a FLOPs column and "Total FLOPs: 0" unless the
    module has an `example_input_array` to count them with. CaptionModule has none (a batch is
    a dict of images or cached features, tokens and lengths), so the zeros are left out and the
    rest of the summary is Lightning's."""
    if "pytorch_lightning" not in sys.modules:  # an entry point without a Trainer (caption): no import
        return
    try:
        from pytorch_lightning.callbacks import RichModelSummary
    except ImportError:  # Lightning without rich: the plain summary, untouched
        return
    if getattr(RichModelSummary.summarize, "_imcap", False):
        return
    lightning_summarize = RichModelSummary.summarize

    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        if total_flops:
            return lightning_summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                       total_training_modes, total_flops, **summarize_kwargs)
        from pytorch_lightning.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        table.add_column(" ", style="dim")
        for name, _values in columns[1:]:  # the first column is the row number
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left")
        for row in zip(*(values for _name, values in columns)):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        grid.add_row(f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}")
        grid.add_row("[bold]Non-trainable params[/]: "
                      f"{get_human_readable_count(int(total_parameters - trainable_parameters))}")
        grid.add_row(f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}")
        grid.add_row(f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(model_size)}")
        console = get_console()
        console.print(table)
        console.print(grid)

    summarize._imcap = True  # type: ignore[attr-defined]
    RichModelSummary.summarize = staticmethod(summarize)
