"""Compare runs without the cloud: `python -m imcap.compare RUN_DIR... [--metric val/CIDEr-D] [--plot curves.png]`.

Prints one row per run with the config values that differ between the runs, the final test
metrics and the best validation score, and writes a PNG of the validation curves (beside the runs unless --plot says where). A folder
that holds several runs (a multirun directory) contributes every run below it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from imcap.config_compose import flatten
from imcap.errors import ImcapError, report_user_errors

SKIP_KEYS = ("paths.", "hydra.", "tags")  # differ between any two runs, say nothing about the method


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("/")


def find_runs(paths: list[str]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file() or (p / "config.yaml").is_file():
            runs.append(p)
        elif p.is_dir():
            found = sorted({m.parent for m in p.rglob("config.yaml") if (m.parent / "csv").is_dir()
                            or (m.parent / "metrics.json").is_file()})
            if not found:
                raise ImcapError(f"{p} holds no imcap run (no metrics.json or config.yaml below it)")
            runs += found
        else:
            raise ImcapError(f"run directory not found: {p}")
    if not runs:
        raise ImcapError("name at least one run directory")
    return runs


def distinguishing(configs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values are not the same in every run."""
    keys = sorted(set().union(*configs))
    return [k for k in keys if not k.startswith(SKIP_KEYS)
            and not any(_is_path(c.get(k)) for c in configs)  # run and data folders differ anyway
            and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def read_curve(run: Path, metric: str) -> list[tuple[int, float]]:
    path = run / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [(int(row["epoch"]), float(row[metric])) for row in csv.DictReader(f)
                if row.get(metric) not in (None, "")]


def load_run(run: Path) -> dict[str, Any]:
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8")) if (run / "metrics.json").is_file() else {}
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml")) if (run / "config.yaml").is_file() else {}
    return {"path": run, "metrics": metrics, "config": flatten(config)}


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_curves(runs: list[dict[str, Any]], labels: list[str], metric: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(label, read_curve(r["path"], metric)) for r, label in zip(runs, labels)]
    if not any(points for _, points in curves):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves:
        if points:
            ax.plot([e for e, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(paths: list[str], metric: str = "val/CIDEr-D", plot: str | None = None) -> list[dict[str, Any]]:
    """Print the table of the runs under `paths` and plot their `metric` curves to `plot` (None:
    curves.png in the folder the runs share, so the picture stays with them; "": no plot)."""
    runs = [load_run(p) for p in find_runs(paths)]
    keys = distinguishing([r["config"] for r in runs])
    labels = [_short(r["path"].name + ": " + ", ".join(f"{k}={r['config'].get(k)}" for k in keys)) for r in runs]
    metric_names = sorted({m for r in runs for m in r["metrics"] if m.startswith("test/")})
    best = f"{metric}_best"

    table = Table(title=f"{len(runs)} runs")
    table.add_column("run")
    table.add_column("differs (config)")
    for m in [best, *metric_names]:
        table.add_column(m.replace("/", "/\n"), justify="right")
    rows = []
    for r in runs:
        values = {m: r["metrics"].get(m, math.nan) for m in [best, *metric_names]}
        rows.append({"run": str(r["path"]), **{k: r["config"].get(k) for k in keys}, **values})
        table.add_row(r["path"].name, "\n".join(f"{k}={r['config'].get(k)}" for k in keys),
                      *(f"{v:.4f}" for v in values.values()))
    terminal = Console()
    # piped or redirected, the table keeps its full width (a terminal wraps it to fit)
    (Console(width=max(100, terminal.width)) if terminal.is_terminal else Console(width=10_000)).print(table)
    if plot is None:
        plot = str(Path(os.path.commonpath([r["path"].resolve() for r in runs])) / "curves.png")
    if plot:
        written = plot_curves(runs, labels, metric, Path(plot))
        print(f"curves: {written}" if written else f"no {metric} curves found (csv logger off?)", file=sys.stderr)
    return rows


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imcap.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding runs")
    parser.add_argument("--metric", default="val/CIDEr-D", help="curve to plot and best value to show")
    parser.add_argument("--plot", help="PNG path for the curves (default: curves.png in the folder the runs share; "
                        "'' for none)")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args(argv)
    rows = compare(args.runs, args.metric, args.plot)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
