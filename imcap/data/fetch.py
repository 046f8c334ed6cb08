"""HTTP downloads that resume: a GET into `<file>.part` with a progress bar, continued by Range
requests after a dropped connection or an earlier run (the host is probed first: imcap.reachability)."""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from imcap.checksums import sha256_of
from imcap.errors import ImcapError

log = logging.getLogger(__name__)

BASE_URL_ENV = "IMCAP_DOWNLOAD_BASE_URL"
CHUNK = 1 << 20
STALL_SECONDS = 10.0  # a transfer that sends nothing this long is retried from where it stopped


class _Transfer:
    """One file's download state: bytes in the .part file and their running sha256."""

    def __init__(self, url: str, part: Path, timeout: float, bar: tqdm):
        self.url, self.part, self.timeout, self.bar = url, part, timeout, bar
        self.done = part.stat().st_size if part.is_file() else 0
        # resuming: the hash covers the bytes already there
        self.digest = sha256_of(part) if self.done else hashlib.sha256()

    def restart(self) -> None:
        self.done, self.digest = 0, hashlib.sha256()
        self.bar.reset(total=self.bar.total)

    def attempt(self) -> int | None:
        """One GET from `self.done` on; returns the expected file size if the server said."""
        headers = {"User-Agent": "imcap-prepare"}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                              timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and self.done:  # nothing after what we have: complete (verified next)
                return self.done
            raise ImcapError(f"HTTP {e.code} {e.reason} for {self.url}; check the URL or the mirror "
                             f"({BASE_URL_ENV})") from e
        with response:
            total = None
            if self.done and response.status == 206:
                m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != self.done:
                    self.restart()
                    raise http.client.HTTPException("unexpected Content-Range; restarting from byte 0")
                total = int(m.group(2)) if m.group(2) != "*" else None
            elif self.done:  # 200: the server ignores Range
                log.info("%s does not resume downloads; restarting from byte 0", self.url)
                self.restart()
            length = response.headers.get("Content-Length")
            if total is None and length is not None:
                total = self.done + int(length)
            with open(self.part, "ab" if self.done else "wb") as f:
                while block := response.read(CHUNK):
                    f.write(block)
                    self.digest.update(block)
                    self.done += len(block)
                    self.bar.update(len(block))
            return total


def download(url: str, path: Path, size: int | None = None, timeout: float | None = None, retries: int = 3) -> str:
    """Fetch `url` into `path` via `path.part` (resumed if present); returns the sha256.

    A dropped connection is retried from where it stopped, up to `retries` times in a row
    without progress; then the .part file stays for the next run to resume.
    """
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name,
               disable=None, leave=False)
    transfer = _Transfer(url, part, timeout or STALL_SECONDS, bar)
    bar.update(transfer.done)
    if transfer.done:
        log.info("Resuming %s at byte %d", path.name, transfer.done)
    stalled, reason = 0, ""
    try:
        while stalled <= retries:
            before = transfer.done
            try:
                total = transfer.attempt()
                if total is None or transfer.done >= total:
                    break
                reason = f"connection closed at byte {transfer.done} of {total}"
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
                    raise ImcapError(f"cannot write {part} ({e.strerror}); free some space or choose "
                                     "another data.root") from e
                reason = f"{type(e).__name__}: {e}"
            stalled = 0 if transfer.done > before else stalled + 1
            log.info("Download of %s interrupted (%s); resuming from byte %d", path.name, reason, transfer.done)
            time.sleep(min(0.5 * 2 ** stalled, 5.0))
        else:
            raise ImcapError(f"download of {url} stopped at byte {transfer.done} ({reason}); re-run to "
                             f"resume, or download it by hand into {path}")
    finally:
        bar.close()
    os.replace(part, path)
    return transfer.digest.hexdigest()
