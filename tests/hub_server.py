"""A loopback stand-in for the Hugging Face Hub: serves a folder tree as model and dataset repos.

Layout of `root`: `models/{owner}/{name}/...` and `datasets/{owner}/{name}/...`; every repo has one revision (any
revision name resolves to it). Only the endpoints `huggingface_hub` (2.4) and `datasets` (5.2) call when downloading
and streaming are implemented (read-only):

    GET  /api/{models|datasets}/{repo}[/revision/{rev}]          repo info (sha, siblings)
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/{path}]       folder listing (`?recursive=true`)
    POST /api/{models|datasets}/{repo}/paths-info/{rev}           info on the given `paths`
    HEAD/GET /{repo}/resolve/{rev}/{file}, /datasets/{repo}/resolve/{rev}/{file}
                                                                  file bytes, ETag / X-Repo-Commit, HTTP Range

Use it behind `HF_ENDPOINT=http://127.0.0.1:PORT` with `HF_HUB_OFFLINE=0` (see tests/test_readme_commands.py).
Every request is recorded in `server.requests` as (method, path, status), so a test can see what was asked for.
"""

import hashlib
import json
import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional, Tuple

REPO_KINDS = ("models", "datasets")
# The Hub's timestamps are ISO 8601; a fixed one keeps the repo info deterministic.
LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)$")


def _repo_sha(repo_dir: Path) -> str:
    """A stable 40-hex 'commit' per repo: the SHA-1 of its file names, sizes and contents' SHA-1."""
    digest = hashlib.sha1()
    for path in sorted(p for p in repo_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(repo_dir)).encode())
        digest.update(_file_sha(path).encode())
    return digest.hexdigest()


def _file_sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class HubServer:
    """`with HubServer(root) as server:` serves `root` on 127.0.0.1 at `server.endpoint` until the block ends."""

    def __init__(self, root, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.requests: List[Tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _record(self, method, path, status):
        with self._lock:
            self.requests.append((method, path, status))

    def _handler_class(self):
        server = self

        class Handler(_Handler):
            hub = server

        return Handler


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: requests are recorded in hub.requests instead
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False):
        self.hub._record(self.command, self.path, status)
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, head: bool = False):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head)

    def _not_found(self, message: str, head: bool = False):
        self._send(404, json.dumps({"error": message}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}, head)

    def _repo_dir(self, kind: str, repo_id: str) -> Optional[Path]:
        path = self.hub.root / kind / repo_id
        return path if path.is_dir() and ".." not in repo_id.split("/") else None

    def _entry(self, repo_dir: Path, path: Path) -> dict:
        rel = str(path.relative_to(repo_dir))
        if path.is_dir():
            return {"type": "directory", "path": rel, "oid": hashlib.sha1(rel.encode()).hexdigest()}
        return {"type": "file", "path": rel, "size": path.stat().st_size, "oid": _file_sha(path)}

    # -- routes ----------------------------------------------------------------------------------------------------

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        parts, _ = self._split()
        # /api/{kind}/{owner}/{name}/paths-info/{rev}
        if len(parts) >= 6 and parts[0] == "api" and parts[1] in REPO_KINDS and parts[4] == "paths-info":
            repo_dir = self._repo_dir(parts[1], "/".join(parts[2:4]))
            if repo_dir is None:
                return self._not_found("repository not found")
            if "json" in (self.headers.get("Content-Type") or ""):
                paths = json.loads(body or "{}").get("paths", [])
            else:
                paths = urllib.parse.parse_qs(body).get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths
            found = [self._entry(repo_dir, repo_dir / p) for p in paths if (repo_dir / p).exists()]
            return self._json(200, found)
        return self._not_found(f"no route for POST {self.path}")

    def _split(self):
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        return parts, urllib.parse.parse_qs(url.query)

    def _route(self, head: bool):
        parts, query = self._split()
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in REPO_KINDS:
            kind, repo_id, rest = parts[1], "/".join(parts[2:4]), parts[4:]
            repo_dir = self._repo_dir(kind, repo_id)
            if repo_dir is None:
                return self._not_found("repository not found", head)
            if not rest or rest[0] == "revision":
                return self._repo_info(kind, repo_id, repo_dir, head)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_dir, "/".join(rest[2:]), query, head)
            return self._not_found(f"no route for {self.path}", head)
        kind = "models"
        if parts[:1] == ["datasets"]:
            kind, parts = "datasets", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_dir = self._repo_dir(kind, "/".join(parts[:2]))
            if repo_dir is None:
                return self._not_found("repository not found", head)
            return self._resolve(repo_dir, "/".join(parts[4:]), head)
        return self._not_found(f"no route for {self.path}", head)

    def _repo_info(self, kind, repo_id, repo_dir, head):
        files = sorted(p for p in repo_dir.rglob("*") if p.is_file())
        info = {
            "id": repo_id, "_id": repo_id, "author": repo_id.split("/")[0], "sha": _repo_sha(repo_dir),
            "lastModified": LAST_MODIFIED, "private": False, "disabled": False, "gated": False, "downloads": 0,
            "likes": 0, "tags": [], "siblings": [{"rfilename": str(p.relative_to(repo_dir))} for p in files],
        }
        if kind == "models":
            info["modelId"] = repo_id
        return self._json(200, info, head)

    def _tree(self, repo_dir, sub, query, head):
        base = repo_dir / sub
        if not base.is_dir():
            return self._not_found(f"folder {sub!r} not found", head)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        children = base.rglob("*") if recursive else base.iterdir()
        return self._json(200, [self._entry(repo_dir, p) for p in sorted(children)], head)

    def _resolve(self, repo_dir, filename, head):
        path = repo_dir / filename
        if ".." in filename.split("/") or not path.is_file():
            return self._not_found(f"{filename} not found", head)
        data = path.read_bytes()
        headers = {
            "ETag": f'"{_file_sha(path)}"', "X-Repo-Commit": _repo_sha(repo_dir), "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, body = 200, data
        match = RANGE_RE.match(self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            start, end = match.group(1), match.group(2)
            if start:
                first, last = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
            else:  # suffix range: the last N bytes
                first, last = max(len(data) - int(end), 0), len(data) - 1
            if first >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            status, body = 206, data[first:last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        headers["Content-Length"] = len(body)
        return self._send(status, body, headers, head)
