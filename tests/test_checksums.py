"""sha256 of files, in chunks, and resumable."""

from __future__ import annotations

import hashlib

from imcap import checksums
from imcap.checksums import sha256_file, sha256_of


def test_sha256_of_a_file_larger_than_one_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "CHUNK", 7)  # several reads, the last one short
    data = bytes(range(256)) * 3
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()


def test_the_running_hash_continues_where_the_file_ends(tmp_path):
    (tmp_path / "part").write_bytes(b"first half, ")
    digest = sha256_of(tmp_path / "part")
    digest.update(b"second half")
    assert digest.hexdigest() == hashlib.sha256(b"first half, second half").hexdigest()
