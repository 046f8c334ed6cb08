"""User mistakes end in one `error: ...` line and exit status 2; real bugs keep their tracebacks."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra.errors import InstantiationException

from imcap.errors import ImcapError, report_user_errors, user_error
from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY, assert_one_line_error, module, run


@report_user_errors
def _fails_with(exc: BaseException) -> None:
    raise exc


def test_an_imcap_error_is_one_line_on_stderr_and_status_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        _fails_with(ImcapError("data.root=/x does not exist"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: data.root=/x does not exist\n"


def test_an_imcap_error_wrapped_by_hydra_is_found():
    try:
        try:
            raise ImcapError("bad image")
        except ImcapError as inner:
            raise InstantiationException("Error in call to target 'x'") from inner
    except InstantiationException as outer:
        assert str(user_error(outer)) == "bad image"


def test_a_bug_inside_a_constructor_hydra_builds_is_not_a_user_error():
    try:
        try:
            raise TypeError("__init__() got an unexpected keyword argument 'hiden_dim'")
        except TypeError as inner:
            raise InstantiationException("Error in call to target 'imcap.models.lstm.LSTMDecoder'") from inner
    except InstantiationException as outer:
        assert user_error(outer) is None


def test_a_bug_raised_while_handling_a_user_error_is_the_bug():
    try:
        try:
            raise ImcapError("handled")
        except ImcapError:
            {}["missing"]
    except KeyError as bug:
        assert user_error(bug) is None


def test_a_real_bug_prints_its_traceback_and_exits_1(capsys):
    with pytest.raises(SystemExit) as exit_:
        _fails_with(ZeroDivisionError("a bug"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "error: " not in err


@pytest.mark.slow
@pytest.mark.parametrize(("bug", "shown"), [("BugInConstructor", "ZeroDivisionError: a bug in a Hydra-built"),
                                            ("BugWhileHandlingUserError", "KeyError: 'missing'")])
def test_a_bug_in_a_constructor_keeps_its_traceback(bug, shown, tmp_path):
    result = run(sys.executable, "-m", "imcap.train", *TINY, f"+callbacks.bug._target_=tests.helpers.callbacks.{bug}",
                 cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and shown in result.stderr, result.stderr[-3000:]
    assert "error: " not in result.stderr


@pytest.mark.slow
def test_missing_data_root_says_what_to_place_where(tmp_path):
    result = module("train", "data=flickr8k", f"data.root={tmp_path}/nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, f"error: data.root={tmp_path}/nowhere does not exist",
                          f"`make data dataset=flickr8k root={tmp_path}/nowhere`")
    assert len(result.stderr.strip().splitlines()) == 1


def in_a_terminal(*args: str, cwd, env: dict) -> tuple[int, str]:
    """Run a command with stdout and stderr on one pseudo-terminal (120 columns, as a user's
    window: tqdm draws nothing 0 columns wide); its exit status and everything it showed."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(list(args), stdin=terminal, stdout=terminal, stderr=terminal, cwd=cwd,
                               env={**os.environ, **env})
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(timeout=600), shown.decode(errors="replace")


@pytest.mark.slow
def test_an_error_after_a_progress_bar_starts_on_its_own_line(tmp_path):
    # a NaN gradient at step 5 of 12 stops the run while Lightning's tqdm bar is on the screen
    status, shown = in_a_terminal(
        sys.executable, "-m", "imcap.train", *TINY, "data.batch_size=4", "trainer.enable_progress_bar=true",
        "callbacks.progress_bar={_target_:pytorch_lightning.callbacks.TQDMProgressBar}",
        "+callbacks.nan._target_=tests.faults.test_divergence.NaNGradientAt", "+callbacks.nan.step=5",
        cwd=tmp_path, env={"IMCAP_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert status == 2, shown[-3000:]
    assert "5/12" in shown  # the bar was drawn
    before, error = shown.split("error: ", 1)
    assert before.endswith("\n"), repr(before[-300:])
    assert error.startswith("training diverged at step 5") and error.count("\n") == 1 and error.endswith("\r\n")


@pytest.mark.realdata
@pytest.mark.slow
def test_ctrl_c_during_feature_extraction_is_one_line_that_says_how_to_continue(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.helpers.paths import FLICKR_1K
    from tests.helpers.runs import ctrl_c_as_in_a_terminal

    process = subprocess.Popen(
        [sys.executable, "-m", "imcap.data", "features", "data=flickr8k", f"data.root={FLICKR_1K}"],
        cwd=tmp_path, env={**os.environ, "IMCAP_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "data" / "features").glob("*.npy")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the cache file exists once extraction has started
    assert process.poll() is None, process.communicate()[1][-3000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "error: interrupted (Ctrl-C); run the same command again" in stderr


def test_ctrl_c_inside_on_ctrl_c_gives_its_advice_and_the_old_handler_comes_back(capsys):
    import os
    import signal

    from imcap.errors import on_ctrl_c

    @report_user_errors
    def testing() -> None:
        with on_ctrl_c("evaluate checkpoints/best.ckpt instead"):
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, delivered before the next bytecode
            raise AssertionError("Ctrl-C did not stop it")

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_:
        testing()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C); evaluate checkpoints/best.ckpt instead\n"
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(SystemExit):  # outside it, Ctrl-C says to run the same command again
        _fails_with(KeyboardInterrupt())
    assert "run the same command again" in capsys.readouterr().err


class SigintWhileTesting(pl.Callback):
    """Sends this process a real SIGINT (Ctrl-C) at the first test batch."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_ctrl_c_while_testing_after_training_says_to_evaluate_the_saved_checkpoint(trained_run, data_dir, tmp_path):
    # resumed from the finished two-epoch run, fit has nothing left to do and the test starts at once;
    # the same command again would train again, so the advice is the saved checkpoint's eval command
    last = trained_run / "checkpoints" / "last.ckpt"
    tiny = [o for o in TINY if not o.startswith("trainer.max_epochs")]
    result = run(sys.executable, "-m", "imcap.train", *tiny, "trainer.max_epochs=2", f"ckpt_path={last}",
                 f"+callbacks.sigint._target_={__name__}.SigintWhileTesting", cwd=tmp_path,
                 env={"PYTHONPATH": str(ROOT), "IMCAP_DATA_DIR": str(data_dir)})
    assert result.returncode == 130, result.stderr[-3000:]
    assert_one_line_error(result, "error: interrupted (Ctrl-C); training finished; evaluate it with: python -m imcap.eval")
    assert "run the same command again" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    checkpoint = Path(shlex.split(line.split("evaluate it with: ", 1)[1])[-1].removeprefix("ckpt_path="))
    assert checkpoint.name == "best.ckpt" and checkpoint.is_file() and tmp_path in checkpoint.parents
