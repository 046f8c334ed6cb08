"""The study's statistics and reports: mean ± std per pair, Welch's test against the reference,
the verdicts the conclusions print, the table and the plot (synthetic runs, no training)."""

from __future__ import annotations

import math

import pytest

from experiments.attention_variants import report
from experiments.attention_variants.report import Summary


def run(decoder: str, attention: str, seed: int, bleu: float, cider: float, grounding: float | None = None,
        chance: float | None = None) -> dict:
    """One run's result.json as study.py writes it."""
    return {"decoder": decoder, "attention": attention, "seed": seed, "split": None, "decoder_params": 7_640_000,
            "test/BLEU-4": bleu, "test/CIDEr-D": cider, "test/grounding": grounding,
            "test/grounding_chance": chance, "train/captions_per_s": 1000.0 + seed}


def study() -> list[dict]:
    """Reference lstm-additive, a pair clearly above it on CIDEr-D, one clearly below, one whose
    spread hides its difference, and Show and Tell without grounding. Seeds outermost, as study.py runs."""
    cider = {"lstm-additive": (4.60, 4.62, 4.64), "lstm-multihead": (4.90, 4.92, 4.94),
             "lstm-dot": (2.10, 2.15, 2.20), "topdown-additive": (4.00, 4.70, 5.40), "lstm-none": (4.59, 4.63, 4.61)}
    grounding = {"lstm-additive": (0.50, 0.52, 0.54), "lstm-multihead": (0.51, 0.52, 0.53),
                 "lstm-dot": (0.10, 0.11, 0.12), "topdown-additive": (0.40, 0.60, 0.50)}
    runs = []
    for k, seed in enumerate((42, 43, 44)):
        for name, values in cider.items():
            decoder, attention = name.split("-")
            g = grounding.get(name)
            runs.append(run(decoder, attention, seed, 0.7, values[k], g[k] if g else None, 0.11 if g else None))
    return runs


def test_summary_is_mean_and_sample_std_of_the_numbers_given():
    s = report.summarize([1.0, None, 2.0, 3.0, float("nan")])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)  # ddof 1; None and NaN are no runs
    assert report.summarize([0.5]) == Summary(0.5, 0.0, 1)
    assert report.summarize([None, None]) is None  # a metric the pair does not have
    assert str(Summary(0.7062, 0.0123, 3)) == "0.706 ± 0.012"
    assert str(Summary(0.7062, 0.0, 1)) == "0.706 (1 run)"


def test_aggregate_keeps_one_row_per_pair_in_run_order_with_n_runs():
    rows = report.aggregate(study())
    assert [r.name for r in rows] == ["lstm-additive", "lstm-multihead", "lstm-dot", "topdown-additive", "lstm-none"]
    assert all(r.runs == 3 for r in rows)
    multihead = rows[1].metrics["test/CIDEr-D"]
    assert multihead.mean == pytest.approx(4.92) and multihead.std == pytest.approx(0.02) and multihead.n == 3
    assert "test/grounding" not in rows[-1].metrics  # Show and Tell has no attention to ground
    assert rows[0].captions_per_s.mean == pytest.approx(1043.0)


def test_welch_p_is_the_textbook_value_and_needs_two_runs_a_side():
    # means 2 and 5, variances 1 and 1: t = 3 / sqrt(2/3) = 3.674 on 4 degrees of freedom
    assert report.welch_p(Summary(2.0, 1.0, 3), Summary(5.0, 1.0, 3)) == pytest.approx(0.02131, abs=1e-5)
    # unequal variances (1 and 13/3): t = 2.75 on Welch-Satterthwaite's 2.88 degrees of freedom
    assert report.welch_p(Summary(2.0, 1.0, 3), Summary(17 / 3, math.sqrt(13 / 3), 3)) == pytest.approx(0.07414, abs=1e-5)
    assert report.welch_p(Summary(2.0, 0.0, 1), Summary(5.0, 1.0, 3)) is None
    # identical runs: an exact difference, or none
    assert report.welch_p(Summary(0.4, 0.0, 3), Summary(0.7, 0.0, 3)) == 0.0
    assert report.welch_p(Summary(0.4, 0.0, 3), Summary(0.4, 0.0, 3)) == 1.0


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert report.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert report.holm([]) == []


def test_compare_separates_differences_beyond_seed_noise_from_those_within_it():
    verdicts = {c.name: c.verdict for c in report.compare(report.aggregate(study()), "test/CIDEr-D")}
    assert verdicts == {"lstm-multihead": "higher", "lstm-dot": "lower",
                        "topdown-additive": "within noise", "lstm-none": "within noise"}
    # the reference must be in the study; a pair with one run is not tested
    assert report.compare(report.aggregate([r for r in study() if r["attention"] != "additive"]), "test/CIDEr-D") == []
    one_seed = report.compare(report.aggregate([r for r in study() if r["seed"] == 42]), "test/CIDEr-D")
    assert {c.verdict for c in one_seed} == {"untested"}


def test_conclusions_list_each_pair_under_its_verdict():
    text = report.conclusions(report.aggregate(study()))
    cider = text.split("**test/CIDEr-D**")[1].split("**")[0]
    above, below, within = (line for line in cider.splitlines() if line.startswith("- "))
    assert "lstm-multihead (+0.300" in above and "holds after Holm" in above
    assert "lstm-dot" in below and "lstm-dot" not in above + within
    assert "topdown-additive" in within and "lstm-none" in within and "lstm-multihead" not in within
    grounding = text.split("**grounding against its chance rate**")[1]
    assert "above chance: lstm-additive, lstm-multihead, topdown-additive;" in grounding
    assert "below chance: none;" in grounding  # lstm-dot's 0.11 is its chance rate exactly
    assert "lstm-dot" in grounding.split("not distinguishable from chance:")[1]
    assert "No runs of the reference" in report.conclusions(report.aggregate(study()), reference=("lstm", "bogus"))


def test_table_shows_mean_std_and_n_per_pair():
    lines = report.table(report.aggregate(study())).splitlines()
    assert lines[0].startswith("| decoder | attention | n | decoder params | test/BLEU-4 | test/CIDEr-D | test/grounding |")
    multihead = next(line for line in lines if line.startswith("| lstm | multihead |"))
    assert "| 3 | 7.64M | 0.700 ± 0.000 | 4.920 ± 0.020 | 0.520 ± 0.010 | 0.110 ± 0.000 | 1043 |" in multihead
    none = next(line for line in lines if line.startswith("| lstm | none |"))
    assert none.count("—") == 2  # no grounding and no chance rate without attention
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_plot_writes_a_png_with_a_panel_per_compared_metric(tmp_path):
    from PIL import Image

    path = tmp_path / "plot.png"
    report.plot(report.aggregate(study()), path, "test")
    one = tmp_path / "one.png"
    report.plot(report.aggregate([r for r in study() if r["attention"] == "none"]), one, "test")
    with Image.open(path) as three_panels, Image.open(one) as two_panels:  # no grounding without attention
        assert three_panels.format == "PNG" and three_panels.height > two_panels.height
