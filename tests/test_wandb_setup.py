"""W&B as users run it: the mode wandb's own credentials select (no server contacted), offline
runs named after what a sweep varies, Hydra choices as config keys, max summaries, caption
tables, and a resumed run continuing its W&B run. The offline run's .wandb file is read back."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from imcap.train import train
from imcap.wandb_setup import run_labels, sweep_run_name
from tests.helpers.paths import ROOT
from tests.helpers.runs import TINY

API_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters: a well-formed key


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's `run-*.wandb` file (wandb's LevelDB-style log:
    a 7-byte ':W&B' header, then 32 KiB blocks of chunks, each `crc32, length, type`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one record complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(run_dir: Path) -> dict:
    """What W&B would show for one offline run: name, group, config, metric definitions,
    history rows and the final summary."""
    out = {"config": {}, "metrics": {}, "history": defaultdict(list), "summary": {}}
    (wandb_file,) = run_dir.glob("run-*.wandb")
    for record in read_wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["group"] = record.run.display_name, record.run.run_group
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "metric" and record.metric.name:
            out["metrics"][record.metric.name] = record.metric
        elif kind == "history":
            for item in record.history.item:
                out["history"][item.key or "/".join(item.nested_key)].append(json.loads(item.value_json))
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def no_credentials_env(tmp_path: Path) -> dict[str, str]:
    """The user's environment without any W&B credentials (and nothing reachable to send to)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "NETRC")}
    return {**env, "NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_BASE_URL": "http://127.0.0.1:9", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_sweep_without_credentials_logs_offline_runs_for_the_dashboards(tmp_path):
    overrides = [o for o in TINY if "attention_dim" not in o and "max_epochs" not in o]
    result = subprocess.run(
        [sys.executable, "-m", "imcap.train", "-m", "logger=wandb", "model/attention=additive,none", "seed=3",
         "trainer.max_epochs=2", "++model.attention.attention_dim=32", *overrides],
        cwd=tmp_path, env={**no_credentials_env(tmp_path), "IMCAP_ROOT": str(tmp_path)},
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,  # never prompts for a key
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("W&B runs offline: wandb found no credentials") == 2
    runs = sorted((tmp_path / "logs").rglob("offline-run-*"))
    assert len(runs) == 2
    sweep = runs[0].parents[2].name
    seen = {}
    for run_dir in runs:
        run = offline_run(run_dir)
        attention = run["config"]["attention"]
        seen[run["name"]] = attention
        assert run["group"] == sweep  # one group per sweep
        assert run["name"] == f"attention={attention}"  # seed=3 is the same for all: not in the name
        assert {k: run["config"][k] for k in ("dataset", "encoder", "decoder", "embedding")} == {
            "dataset": "shapes", "encoder": "mobilenet_v2", "decoder": "lstm", "embedding": "learned"}
        assert run["config"]["model"]["decoder"]["hidden_dim"] == 64  # the full config stays too
        for name in ("val/CIDEr-D", "val/BLEU-4", "val/CIDEr-D_best"):
            assert run["metrics"][name].summary.max, name
        assert run["metrics"]["val/loss"].summary.min
        cider = run["history"]["val/CIDEr-D"]
        assert len(cider) == 2  # one value per validation epoch
        assert run["summary"]["val/CIDEr-D"] == {"max": max(cider)}
        assert "test/BLEU-4" in run["summary"]
        assert len(run["history"]["val/captions/_type"]) == 2  # a caption table each epoch
        (table_file, *_) = sorted(run_dir.rglob("captions_*.table.json"))
        table = json.loads(table_file.read_text())
        assert table["columns"] == ["image_id", "image", "caption", "references", "attention"]
        assert len(table["data"]) == 8 and all(row[2] for row in table["data"]) is not None
        has_overlay = [row[4] is not None for row in table["data"]]
        assert all(has_overlay) if attention == "additive" else not any(has_overlay)
    assert sorted(seen.values()) == ["additive", "none"]


def test_run_name_lists_what_the_sweep_varies(make_cfg, tmp_path):
    cfg = make_cfg("model/attention=multihead", "seed=1", "trainer.max_epochs=3", tiny=False)
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(
        {"hydra": {"overrides": {"task": ["model/attention=additive,multihead", "seed=1,2",
                                          "trainer.max_epochs=3"]}}}))
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path)
        cfg.hydra.overrides.task = ["model/attention=multihead", "seed=1", "trainer.max_epochs=3"]
    HydraConfig().set_config(cfg)
    assert sweep_run_name() == "attention=multihead,seed=1"
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = RunMode.RUN
    HydraConfig().set_config(cfg)
    assert sweep_run_name() is None  # a single run keeps W&B's own name


def test_choices_are_the_config_keys_with_or_without_hydra_runtime(make_cfg):
    cfg = make_cfg("data=flickr8k", "model/encoder=resnet18", "model/attention=none", tiny=False)
    expected = {"dataset": "flickr8k", "encoder": "resnet18", "decoder": "lstm", "attention": "none",
                "embedding": "learned"}
    assert run_labels(cfg) == expected
    HydraConfig.instance().cfg = None  # composed in a notebook: the registry names the components
    assert run_labels(cfg) == expected


CHOOSE_MODE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from imcap.config_compose import compose_config
from imcap.wandb_setup import configure_wandb_mode
cfg = compose_config("train", ["logger=wandb"], sys.argv[1])
print("mode:", configure_wandb_mode(cfg), "offline:", cfg.logger.wandb.get("mode"))
"""


@pytest.mark.slow
def test_wandb_login_credentials_in_netrc_select_online_without_contacting_a_server(tmp_path):
    # a W&B "server" that must never be called: any connection to it would be accepted here
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    host = f"127.0.0.1:{server.getsockname()[1]}"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC",)}
    env.update(HOME=str(home), WANDB_BASE_URL=f"http://{host}", PYTHONPATH=str(ROOT))

    def choose(**extra: str) -> str:
        result = subprocess.run([sys.executable, "-c", CHOOSE_MODE, str(tmp_path / "run")], cwd=tmp_path,
                                env={**env, **extra}, capture_output=True, text=True, timeout=300,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    out = choose()
    assert "W&B runs offline: wandb found no credentials" in out and "mode: offline offline: offline" in out
    # what `wandb login --host http://<host>` writes
    netrc = home / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {API_KEY}\n")
    netrc.chmod(0o600)
    out = choose()
    assert "W&B runs online: wandb found credentials" in out and "mode: online offline: None" in out
    out = choose(WANDB_MODE="offline")  # the user's explicit choice wins over the credentials
    assert "W&B runs offline: WANDB_MODE=offline is set" in out
    with pytest.raises(BlockingIOError):
        server.accept()  # nobody called the server
    server.close()


@pytest.mark.slow
def test_malformed_key_is_one_line_error(tmp_path):
    env = no_credentials_env(tmp_path)
    (tmp_path / "netrc").write_text("machine 127.0.0.1:9\n  login user\n  password short\n")
    result = subprocess.run([sys.executable, "-m", "imcap.train", "logger=wandb"], cwd=tmp_path,
                            env={**env, "NETRC": str(tmp_path / "netrc"), "IMCAP_ROOT": str(tmp_path)},
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "W&B credentials are unusable" in line and "wandb login --relogin" in line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    train(make_cfg("logger=wandb", "trainer.max_epochs=1", "test=false", out=out))
    run_id = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["imcap"]["wandb_run_id"]
    assert run_id
    train(make_cfg("logger=wandb", "trainer.max_epochs=2", "test=false", f"ckpt_path={out}/checkpoints/last.ckpt",
                   out=out))
    ids = {r.name.rsplit("-", 1)[-1] for r in sorted(out.rglob("offline-run-*"))}
    assert ids == {run_id}
