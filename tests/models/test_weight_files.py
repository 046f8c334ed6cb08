"""Pretrained weight files of timm and open_clip: the local cache first, a download only when the host answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from imcap import reachability
from imcap.errors import ImcapError
from imcap.models import weight_files
from tests.helpers.http_server import closed_port, serving


@pytest.fixture
def hf_cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    return tmp_path / "hf"


def _place(cache: Path, repo_id: str, filename: str, data: bytes = b"weights") -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("cafe")
    path = repo / "snapshots" / "cafe" / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


WEIGHTS = weight_files.WeightsFile("timm test", "org/model", ("model.safetensors", "pytorch_model.bin"))


def test_a_cached_file_is_used_without_the_network(hf_cache, monkeypatch):
    monkeypatch.setattr(reachability.socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    second = _place(hf_cache, "org/model", "pytorch_model.bin")
    assert weight_files.fetch(WEIGHTS) == second  # the second candidate, since the first is not there


def test_online_the_first_file_that_exists_is_downloaded(hf_cache, monkeypatch, tmp_path):
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.setattr(reachability.socket, "create_connection", lambda *a, **k: open(__file__))  # any context manager
    asked = []

    def download(repo_id, filename):
        asked.append(filename)
        if filename == "model.safetensors":
            raise EntryNotFoundError("no such file")
        (tmp_path / filename).write_bytes(b"w")
        return str(tmp_path / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    assert weight_files.fetch(WEIGHTS) == tmp_path / "pytorch_model.bin"
    assert asked == ["model.safetensors", "pytorch_model.bin"]


def test_a_failed_download_is_one_line_naming_the_file(hf_cache, monkeypatch):
    monkeypatch.setattr(reachability.socket, "create_connection", lambda *a, **k: open(__file__))

    def download(repo_id, filename):
        raise OSError("disk full\nmore detail")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    with pytest.raises(ImcapError, match=r"could not be downloaded \(disk full\): .*hf download org/model") as info:
        weight_files.fetch(WEIGHTS)
    assert "\n" not in str(info.value)


def test_a_url_is_downloaded_into_the_librarys_cache_once(hf_cache, tmp_path):
    with serving() as server:
        server.files["mirror/w-123.pth"] = b"0123456789"
        weights = weight_files.WeightsFile("timm old", url=f"{server.url}/w-123.pth", url_cache=tmp_path / "checkpoints")
        path = weight_files.fetch(weights)
        assert path == tmp_path / "checkpoints" / "w-123.pth" and path.read_bytes() == b"0123456789"
        del server.files["mirror/w-123.pth"]
        assert weight_files.fetch(weights) == path  # from the cache now


def test_an_unreachable_url_fails_at_once(hf_cache, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/w.pth"
    weights = weight_files.WeightsFile("timm old", url=url, url_cache=tmp_path / "c")
    with pytest.raises(ImcapError, match=r"127.0.0.1 cannot be reached: .*place w.pth .* in .*/c"):
        weight_files.fetch(weights)
