import json

import pytest
from omegaconf import OmegaConf

from imcap.compare import compare, main


def fake_run(folder, attention, best, curve):
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": {"attention": {"_target_": attention}, "decoder": {"hidden_dim": 512}},
                                     "paths": {"output_dir": str(folder)}, "seed": 1}), folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps({"val/BLEU-4_best": best, "test/BLEU-4": best - 0.01}))
    (folder / "csv").mkdir()
    rows = ["epoch,step,val/BLEU-4,train/loss"] + [f"{e},{e},{v}," for e, v in enumerate(curve)] + ["0,1,,2.5"]
    (folder / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_table_shows_only_what_differs_and_plots_curves(tmp_path, capsys):
    fake_run(tmp_path / "sweep" / "0", "additive", 0.7, [0.5, 0.6, 0.7])
    fake_run(tmp_path / "sweep" / "1", None, 0.6, [0.4, 0.6])
    rows = compare([str(tmp_path / "sweep")], metric="val/BLEU-4", plot=str(tmp_path / "curves.png"))
    assert [r["model.attention._target_"] for r in rows] == ["additive", None]
    assert [r["val/BLEU-4_best"] for r in rows] == [0.7, 0.6]
    assert "model.decoder.hidden_dim" not in rows[0] and "paths.output_dir" not in rows[0]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "0.7000" in capsys.readouterr().out


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "run directory not found" in capsys.readouterr().err


def test_piped_the_table_keeps_its_width_and_the_curves_land_beside_the_runs(tmp_path):
    """As `make compare ARGS=... | less` runs it: a new process whose stdout is a pipe, from
    another folder; no header is cut, and no curves.png is left where the command was typed."""
    import subprocess
    import sys

    from tests.helpers.paths import ROOT

    long_name = "imcap.models.attention.AdditiveAttentionWithAVeryLongNameIndeed"
    fake_run(tmp_path / "sweep" / "0", long_name, 0.7, [0.5, 0.6, 0.7])
    fake_run(tmp_path / "sweep" / "1", None, 0.6, [0.4, 0.6])
    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run([sys.executable, "-m", "imcap.compare", str(tmp_path / "sweep"), "--metric", "val/BLEU-4"],
                          cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    assert long_name in done.stdout and "…" not in done.stdout
    assert "BLEU-4_best" in done.stdout
    assert (tmp_path / "sweep" / "curves.png").stat().st_size > 1000
    assert list((tmp_path / "elsewhere").iterdir()) == []
