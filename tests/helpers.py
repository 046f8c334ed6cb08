"""Test-only callbacks and utilities."""

from __future__ import annotations

import pytorch_lightning as pl


class CrashAtEpoch(pl.Callback):
    """Simulates a run killed mid-way: raises when `epoch` starts, after the previous epoch's
    checkpoints were written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")


def write_untrained_checkpoint(cfg, path) -> dict:
    """An imcap checkpoint of the (untrained) model a composed train config describes, written
    the way training writes one; returns it. For tests that need a checkpoint but no training;
    its captions repeat the word "a"."""
    import torch

    from imcap.data.vocab import SPECIALS, Vocabulary
    from imcap.train import build_module

    torch.manual_seed(0)  # the same untrained weights every time
    vocab = Vocabulary([*SPECIALS, "a", "red", "circle", "square"])
    module = build_module(cfg, vocab)
    with torch.no_grad():  # it says "a a a ...": captions with words, whatever the weights
        module.captioner.decoder.output.bias[vocab.stoi["a"]] += 100.0
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return checkpoint


class BugInConstructor(pl.Callback):
    """A callback whose constructor has a bug: it must surface with its traceback."""

    def __init__(self):
        raise ZeroDivisionError("a bug in a Hydra-built constructor")


class BugWhileHandlingUserError(pl.Callback):
    """A bug raised while an ImcapError is being handled: it is the bug that must surface."""

    def __init__(self):
        from imcap.errors import ImcapError

        try:
            raise ImcapError("a user error that was handled")
        except ImcapError:
            {}["missing"]  # the bug


class PauseAt(pl.Callback):
    """Stops the run in the middle of `epoch` (before batch `batch`) and waits there to be killed:
    writes `marker` so that a test knows when to send SIGKILL."""

    def __init__(self, epoch: int, batch: int, marker: str):
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            import signal
            from pathlib import Path

            Path(self.marker).write_text("paused")
            while True:
                signal.pause()  # until the test's SIGKILL


class DieWritingCheckpointAt(pl.Callback):
    """The kernel kills the run while it writes the checkpoint of `epoch`: from that epoch's
    validation on, no file may grow past half the size of last.ckpt, and SIGXFSZ (which
    Python ignores) gets its default action back: termination, mid-write."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch or trainer.sanity_checking:
            return
        import os
        import resource
        import signal

        size = os.path.getsize(os.path.join(trainer.checkpoint_callback.dirpath, "last.ckpt"))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def serve_hub_repo(folder, repo: str, sha: str = "0" * 40):
    """A stand-in Hugging Face Hub on 127.0.0.1 serving the files of `folder` as model `repo`
    (the three routes `snapshot_download` uses: file tree, repo info, resolve). Returns the
    running server; its endpoint is http://127.0.0.1:<server.server_address[1]>."""
    import hashlib
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, body: bytes, headers: dict, send_body: bool) -> None:
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def answer(self, send_body: bool) -> None:
            path = self.path.split("?")[0]
            if path.startswith(f"/api/models/{repo}/tree/"):
                tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in files.items()]
                return self.reply(json.dumps(tree).encode(), {"Content-Type": "application/json"}, send_body)
            if path.startswith(f"/api/models/{repo}"):
                info = {"id": repo, "sha": sha, "siblings": [{"rfilename": n} for n in files]}
                return self.reply(json.dumps(info).encode(), {"Content-Type": "application/json"}, send_body)
            prefix = f"/{repo}/resolve/"
            name = path[len(prefix):].split("/", 1)[-1] if path.startswith(prefix) else None
            if name in files:
                etag = f'"{hashlib.sha256(files[name]).hexdigest()}"'
                return self.reply(files[name], {"X-Repo-Commit": sha, "ETag": etag}, send_body)
            self.send_response(404)
            self.end_headers()

        def do_GET(self) -> None:
            self.answer(True)

        def do_HEAD(self) -> None:
            self.answer(False)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
