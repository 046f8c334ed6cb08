"""A local HTTP server on 127.0.0.1 that serves files from memory, the way archive hosts do
(`Range` requests, a connection that drops mid-file); and a port where nothing listens."""

from __future__ import annotations

import http.server
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Handler(http.server.BaseHTTPRequestHandler):
    """GET with optional `Range: bytes=N-`; can cut a response short once per file."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        data = server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start, wanted = 0, self.headers.get("Range")
        if wanted and server.ranges:
            start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = server.cut.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])  # then the connection closes

    def log_message(self, *args):
        pass


@contextmanager
def serving() -> Iterator[http.server.ThreadingHTTPServer]:
    """A running server: put bytes in `.files["mirror/NAME"]`; its base URL is `.url`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.cut, httpd.ranges = {}, [], {}, True
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/mirror"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port() -> int:
    """A local port where nothing listens (a connection is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
