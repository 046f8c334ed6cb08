"""A stand-in Hugging Face Hub on 127.0.0.1 serving one model repo from a local folder."""

from __future__ import annotations


def serve_hub_repo(folder, repo: str, sha: str = "0" * 40, tags: dict | None = None):
    """A stand-in Hugging Face Hub on 127.0.0.1 serving the files of `folder` as model `repo`
    at commit `sha` (its main branch), and `tags` {name: (folder, commit)} as other revisions
    (the three routes `snapshot_download` uses: file tree, repo info, resolve). Returns the
    running server; its endpoint is http://127.0.0.1:<server.server_address[1]>."""
    import hashlib
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    def read(where) -> dict:
        return {p.name: p.read_bytes() for p in Path(where).iterdir() if p.is_file()}

    revisions = {"main": (read(folder), sha), sha: (read(folder), sha)}
    for name, (where, commit) in (tags or {}).items():
        revisions[name] = revisions[commit] = (read(where), commit)

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
            api, prefix = f"/api/models/{repo}", f"/{repo}/resolve/"
            rest = path[len(api):].lstrip("/").split("/") if path.startswith(api) else []
            rev = rest[1] if len(rest) > 1 and rest[0] in ("tree", "revision") else "main"
            if path.startswith(prefix):
                rev, _, name = path[len(prefix):].partition("/")
            files, commit = revisions.get(rev, ({}, None))
            if path.startswith(api) and commit is not None and rest[:1] == ["tree"]:
                tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in files.items()]
                return self.reply(json.dumps(tree).encode(), {"Content-Type": "application/json"}, send_body)
            if path.startswith(api) and commit is not None:
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in files]}
                return self.reply(json.dumps(info).encode(), {"Content-Type": "application/json"}, send_body)
            if path.startswith(prefix) and name in files:
                etag = f'"{hashlib.sha256(files[name]).hexdigest()}"'
                return self.reply(files[name], {"X-Repo-Commit": commit, "ETag": etag}, send_body)
            self.send_response(404)
            self.end_headers()

        def do_GET(self) -> None:
            self.answer(True)

        def do_HEAD(self) -> None:
            self.answer(False)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
