"""A stand-in Hugging Face Hub on 127.0.0.1 serving one model repo from a local folder."""

from __future__ import annotations


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
