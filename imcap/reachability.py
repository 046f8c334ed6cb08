"""Whether a host answers: asked once, quickly, before any download, so that an offline machine
gets one line saying what to place where instead of a retry loop that runs for minutes.

The one probe of the package: dataset archives (`imcap.data.download`) and pretrained weights
(`imcap.models.weight_files`) both ask here, with the same default wait.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from urllib.parse import urlsplit

PROBE_SECONDS = 5.0


def unreachable(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why no TCP connection to the URL's host (or the proxy that would carry it) opens within
    `timeout` seconds, or None when one does.

    Runs in a thread so that a hanging DNS lookup cannot outlast the timeout.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    outcome: dict[str, str] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            outcome["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"no answer from {host} within {timeout:g} s"
    return outcome.get("error")
