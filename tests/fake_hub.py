"""A local stand-in for the Hugging Face Hub on a loopback port (point HF_ENDPOINT at `url`): it serves dataset
repositories from local folders, one commit each, through the routes huggingface_hub's HfApi and HfFileSystem
use to list and read a repository: repo info, tree listing, paths-info, and file resolve (GET with Range, HEAD).
Every file read through resolve is logged, so a test can say which files were downloaded and when."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".parquet", ".zst", ".gz")


@dataclass
class Read:
    """One resolve request: the file and the byte range asked for (None: the whole file, or a HEAD)."""

    method: str
    path: str
    range: str | None


@dataclass
class FakeHub:
    """Dataset repositories `owner/name` -> local folder, served at `url` until `close()`."""

    repos: dict[str, Path]
    reads: list[Read] = field(default_factory=list)
    denied: set[str] = field(default_factory=set)  # repo paths (`owner/name/file`) whose bytes a GET is refused (403)

    def __post_init__(self) -> None:
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._lock = threading.Lock()

    def log(self, read: Read) -> None:
        with self._lock:
            self.reads.append(read)

    def downloaded(self) -> set[str]:
        """The repo paths (`owner/name/file`) whose bytes were fetched (GET)."""
        with self._lock:
            return {r.path for r in self.reads if r.method == "GET"}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _entry(root: Path, path: Path) -> dict[str, Any]:
    rel = path.relative_to(root).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "path": rel}
    data = path.read_bytes()
    entry: dict[str, Any] = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                             "size": len(data), "path": rel}
    if rel.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


API = re.compile(r"^/api/datasets/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(/.*)?)?$")
RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_length: int | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: object) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _missing(self, code: str = "RepoNotFound") -> None:
        self._send(404, b'{"error": "not found"}', {"X-Error-Code": code, "Content-Type": "application/json"})

    def _repo(self, name: str) -> Path | None:
        return self.owner.repos.get(unquote(name))

    def do_GET(self) -> None:
        url = urlparse(self.path)
        api, resolve = API.match(url.path), RESOLVE.match(url.path)
        if api:
            self._api(api, parse_qs(url.query), None)
        elif resolve:
            self._resolve(resolve)
        else:
            self._missing()

    do_HEAD = do_GET

    def do_POST(self) -> None:
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        api = API.match(url.path)
        if api:
            self._api(api, parse_qs(url.query), parse_qs(body))
        else:
            self._missing()

    def _api(self, match: re.Match[str], query: dict[str, list[str]], form: dict[str, list[str]] | None) -> None:
        name, route, _, sub = match.groups()
        root = self._repo(name)
        if root is None:
            return self._missing()
        files = sorted(p for p in root.rglob("*"))
        if route in (None, "revision"):
            return self._json({"id": unquote(name), "_id": SHA[:24], "sha": SHA, "private": False,
                               "siblings": [{"rfilename": p.relative_to(root).as_posix()} for p in files
                                            if p.is_file()]})
        if route == "paths-info":
            wanted = (form or {}).get("paths", [])
            return self._json([_entry(root, root / w) for w in wanted if (root / w).exists()])
        folder = unquote(sub or "/").strip("/")
        base = root / folder if folder else root
        if not base.is_dir():
            return self._missing("EntryNotFound")
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        entries = sorted(base.rglob("*") if recursive else base.iterdir())
        return self._json([_entry(root, p) for p in entries])

    def _resolve(self, match: re.Match[str]) -> None:
        name, _, rel = match.groups()
        root = self._repo(name)
        path = root / unquote(rel) if root else None
        if path is None or not path.is_file():
            return self._missing("EntryNotFound")
        data = path.read_bytes()
        ranged = self.headers.get("Range")
        self.owner.log(Read(self.command, f"{unquote(name)}/{unquote(rel)}", ranged))
        headers = {"ETag": f'"{_entry(root, path)["oid"]}"', "X-Repo-Commit": SHA, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if self.command == "GET" and f"{unquote(name)}/{unquote(rel)}" in self.owner.denied:
            return self._send(403, b'{"error": "Access to this file is restricted"}', {"X-Error-Code": "GatedRepo"})
        if ranged and self.command == "GET":
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers)
        return self._send(200, data, headers, content_length=len(data))
