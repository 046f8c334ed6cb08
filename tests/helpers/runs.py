"""Runs as a user starts them: tiny-run overrides, and entry points in a new process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# A model and dataset small enough for a CPU epoch in a second or two.
TINY = [
    "data.source.num_images={train:48,val:16,test:16}",
    "data.source.image_size=64",
    "data.batch_size=16",
    "data.eval_batch_size=16",
    "model.decoder.hidden_dim=64",
    "++model.attention.attention_dim=32",
    "model.embedding.dim=32",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "model.test_metrics=[BLEU,ROUGE-L,CIDEr-D]",  # METEOR's Java start (7 s) is tested in tests/metrics
]


def ctrl_c_as_in_a_terminal() -> None:
    """`preexec_fn` of a process a test sends Ctrl-C: SIGINT acts as in a terminal's foreground job,
    also when the test runner was started in the background (whose children inherit it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """A command in a new process, with generated files under `cwd` (IMCAP_ROOT)."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "IMCAP_ROOT": str(cwd), **(env or {})})


def module(name: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m imcap.<name> overrides...` in a new process."""
    return run(sys.executable, "-m", f"imcap.{name}", *overrides, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The run failed with a user error: no traceback, and each fragment in what it said."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def kill_9_once_marked(command: list[str], marker: Path, *, cwd: Path, env: dict[str, str], log: Path,
                       timeout: int = 900) -> None:
    """Start `command` in a session of its own (stdout and stderr to `log`), wait until it writes
    `marker` (tests/helpers/callbacks.py RecordItems' stop_at_step, where the run hangs), then
    kill -9 the whole group: the run, its DDP ranks and their data-loader workers."""
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout  # a limit for a loaded machine, not a speed requirement
    try:
        while not marker.exists():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{marker} not written in {timeout} s"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # also when the run failed: none of its ranks lingers
        except ProcessLookupError:
            pass
        process.wait()


def train_offline(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m imcap.train` in a new process, offline, with an empty Hugging Face cache."""
    return run(sys.executable, "-m", "imcap.train", *overrides, cwd=cwd, timeout=900,
               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf")})


def every_decoder_trains_from_random_and_from_file(cwd: Path, weights_file: Path, *encoder: str) -> None:
    """A `fast_dev_run` multirun, offline, of every decoder with the `encoder` overrides, once with
    random weights and once from `weights_file` (model.encoder.weights_path): every job trains."""
    from omegaconf import OmegaConf

    result = train_offline(cwd, "--multirun", *TINY, *encoder, f"model.encoder.weights_path=null,{weights_file}",
                           "model/decoder=lstm,topdown,transformer", "trainer.fast_dev_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = set()
    for metrics_file in (cwd / "logs" / "train" / "multiruns").glob("*/*/metrics.json"):
        model = OmegaConf.load(metrics_file.parent / "config.yaml").model
        seen.add((model.decoder._target_.rsplit(".", 1)[1], model.encoder.weights_path))
        assert json.loads(metrics_file.read_text(encoding="utf-8"))["train/loss"] > 0
    decoders = {"LSTMDecoder", "TopDownDecoder", "TransformerDecoder"}
    assert seen == {(d, w) for d in decoders for w in (None, str(weights_file))}
