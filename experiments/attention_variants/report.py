"""What the attention-variant study's runs say: mean ± std per pair over its seeds (and image
splits), each pair against the reference pair by Welch's t-test, the Markdown table, the written
conclusions and the error-bar plot. Pure functions of the runs' result.json dicts (study.py
writes those); nothing here trains.

The rule for "exceeds seed noise": Welch's two-sided t-test of a pair's runs against the
reference pair's runs (unequal variances), p < ALPHA. Each verdict also says whether it survives
Holm's correction for the number of pairs compared on that metric.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

# Show, Attend and Tell: the pair every other one is compared with
REFERENCE = ("lstm", "additive")
ALPHA = 0.05
# shown in the table when the runs have them (higher is better for all of them)
METRICS = ("test/BLEU-4", "test/METEOR", "test/ROUGE-L", "test/CIDEr-D", "test/grounding")
# compared with the reference, in the conclusions and the plot
COMPARED = ("test/BLEU-4", "test/CIDEr-D", "test/grounding")
CHANCE = "test/grounding_chance"


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (ddof=1; 0 for one run) of n runs."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f} (1 run)"


def summarize(values: Iterable[float | None]) -> Summary | None:
    """The Summary of the values that are numbers; None when there are none (a metric a pair
    does not have, such as grounding without attention)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return Summary(mean, std, len(xs))


@dataclass(frozen=True)
class Row:
    """One decoder x attention pair over its runs."""

    decoder: str
    attention: str
    runs: int
    metrics: dict[str, Summary]  # metric -> Summary, for the metrics the pair has
    decoder_params: int
    captions_per_s: Summary | None

    @property
    def pair(self) -> tuple[str, str]:
        return self.decoder, self.attention

    @property
    def name(self) -> str:
        return f"{self.decoder}-{self.attention}"


def aggregate(results: Sequence[dict]) -> list[Row]:
    """One Row per pair, in the order the pairs first appear in `results`."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["decoder"], r["attention"]), []).append(r)
    rows = []
    for (decoder, attention), runs in groups.items():
        summaries = {m: summarize(r.get(m) for r in runs) for m in (*METRICS, CHANCE)}
        rows.append(Row(decoder, attention, len(runs), {m: s for m, s in summaries.items() if s is not None},
                        runs[0]["decoder_params"], summarize(r.get("train/captions_per_s") for r in runs)))
    return rows


def welch_p(a: Summary, b: Summary) -> float | None:
    """Two-sided p-value of Welch's t-test for equal means; None with fewer than 2 runs on a side.
    With no spread on either side the difference is exact: p is 0 if the means differ, else 1."""
    if a.n < 2 or b.n < 2:
        return None
    if a.std == 0 and b.std == 0:
        return 0.0 if a.mean != b.mean else 1.0
    return float(stats.ttest_ind_from_stats(a.mean, a.std, a.n, b.mean, b.std, b.n, equal_var=False).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given (a family of m tests)."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: pvalues[k])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Comparison:
    """One pair against the reference on one metric."""

    name: str
    difference: float  # pair mean - reference mean
    p: float | None  # Welch; None: fewer than 2 runs on a side
    p_holm: float | None

    @property
    def verdict(self) -> str:
        """'higher' / 'lower' (exceeds seed noise), 'within noise', or 'untested'."""
        if self.p is None:
            return "untested"
        if self.p >= ALPHA:
            return "within noise"
        return "higher" if self.difference > 0 else "lower"


def compare(rows: Sequence[Row], metric: str, reference: tuple[str, str] = REFERENCE) -> list[Comparison]:
    """Every pair that has `metric`, other than the reference, against the reference; [] when the
    reference has no runs with it."""
    ref = next((r.metrics.get(metric) for r in rows if r.pair == reference), None)
    if ref is None:
        return []
    others = [r for r in rows if r.pair != reference and metric in r.metrics]
    ps = [welch_p(r.metrics[metric], ref) for r in others]
    tested = [p for p in ps if p is not None]
    adjusted = iter(holm(tested))
    return [Comparison(r.name, r.metrics[metric].mean - ref.mean, p, None if p is None else next(adjusted))
            for r, p in zip(others, ps)]


def _cell(s: Summary | None) -> str:
    return "—" if s is None else str(s)


def table(rows: Sequence[Row]) -> str:
    """The Markdown table: mean ± std over n runs per pair, for the metrics any run has."""
    shown = [m for m in METRICS if any(m in r.metrics for r in rows)]
    grounding = "test/grounding" in shown
    head = ["decoder", "attention", "n", "decoder params", *shown, *(["grounding chance"] if grounding else []),
            "train captions/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [r.decoder, r.attention, str(r.runs), f"{r.decoder_params / 1e6:.2f}M",
                 *(_cell(r.metrics.get(m)) for m in shown),
                 *([_cell(r.metrics.get(CHANCE))] if grounding else []),
                 "—" if r.captions_per_s is None else f"{r.captions_per_s.mean:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _listed(items: Sequence[Comparison]) -> str:
    def one(c: Comparison) -> str:
        holds = "" if c.p is None or c.p >= ALPHA else (", holds after Holm" if c.p_holm < ALPHA else ", not after Holm")
        return f"{c.name} ({c.difference:+.3f}, p={c.p:.3g}{holds})" if c.p is not None else f"{c.name} ({c.difference:+.3f})"

    return ", ".join(one(c) for c in items) if items else "none"


def conclusions(rows: Sequence[Row], reference: tuple[str, str] = REFERENCE) -> str:
    """Markdown bullet lists, per compared metric: the pairs above and below the reference by
    more than seed noise, and those within it."""
    ref = next((r for r in rows if r.pair == reference), None)
    name = f"{reference[0]}-{reference[1]}"
    if ref is None:
        return f"No runs of the reference pair {name}: nothing to compare against."
    lines = [f"Each pair against the reference {name} (Show, Attend and Tell): Welch's two-sided t-test "
             f"over the runs (seeds × image splits), a difference exceeds seed noise when p < {ALPHA}. "
             "With many pairs some p < 0.05 arise by chance (about 1 in 20 of the true nulls); "
             "\"holds after Holm\" marks those that survive Holm's correction for the number of pairs "
             "compared on that metric."]
    for metric in COMPARED:
        comparisons = compare(rows, metric, reference)
        if metric not in ref.metrics or not comparisons:
            continue
        by = {v: [c for c in comparisons if c.verdict == v] for v in ("higher", "lower", "within noise", "untested")}
        lines += ["", f"**{metric}** (reference {ref.metrics[metric]}, n={ref.metrics[metric].n}):",
                  f"- above the reference, beyond seed noise: {_listed(by['higher'])}",
                  f"- below the reference, beyond seed noise: {_listed(by['lower'])}",
                  f"- within seed noise of it: {_listed(by['within noise'])}"]
        if by["untested"]:
            lines.append(f"- not tested (fewer than 2 runs): {_listed(by['untested'])}")
    grounded = [(r, welch_p(r.metrics["test/grounding"], r.metrics[CHANCE])) for r in rows
                if "test/grounding" in r.metrics and CHANCE in r.metrics]
    if grounded:
        def group(test) -> str:
            return ", ".join(r.name for r, p in grounded if p is not None and test(r, p)) or "none"

        lines += ["", "**grounding against its chance rate** (Welch, same rule): "
                  f"above chance: {group(lambda r, p: p < ALPHA and r.metrics['test/grounding'].mean > r.metrics[CHANCE].mean)}; "
                  f"below chance: {group(lambda r, p: p < ALPHA and r.metrics['test/grounding'].mean < r.metrics[CHANCE].mean)}; "
                  f"not distinguishable from chance: {group(lambda r, p: p >= ALPHA)}."]
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """A PNG with one panel per compared metric: each pair's mean with a ±1 std error bar, the
    reference pair's bar highlighted and its mean drawn across the panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in COMPARED if any(m in r.metrics for r in rows)]
    width = max(6.0, 0.55 * len(rows) + 2)  # inches
    fig, axes = plt.subplots(len(metrics), 1, figsize=(width, 2.6 * len(metrics) + 0.8), sharex=True, squeeze=False)
    xs = list(range(len(rows)))
    for ax, metric in zip(axes[:, 0], metrics):
        summaries = [r.metrics.get(metric) for r in rows]
        colors = ["tab:orange" if r.pair == REFERENCE else "tab:blue" for r in rows]
        ax.bar(xs, [s.mean if s else math.nan for s in summaries], yerr=[s.std if s else math.nan for s in summaries],
               color=colors, capsize=3, error_kw={"elinewidth": 1})
        ref = next((s for r, s in zip(rows, summaries) if r.pair == REFERENCE and s), None)
        if ref is not None:
            ax.axhline(ref.mean, color="tab:orange", linestyle="--", linewidth=1)
        if metric == "test/grounding":
            chance = [r.metrics.get(CHANCE) for r in rows]
            ax.scatter([x for x, c in zip(xs, chance) if c], [c.mean for c in chance if c], marker="_", s=200,
                       color="black", label="chance rate", zorder=3)
            ax.legend(fontsize=7, loc="upper right")
        ax.set_ylabel(metric.removeprefix("test/"))
    axes[-1, 0].set_xticks(xs, [f"{r.decoder}\n{r.attention}\nn={r.runs}" for r in rows], fontsize=7)
    fig.suptitle(textwrap.fill(title, width=int(width * 12)), fontsize=9)  # ~12 characters an inch at 9 pt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
