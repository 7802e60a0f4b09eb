"""A loopback fake of the part of the Hugging Face Hub HTTP API that ``upload_folder`` uses.

Routes (as called by huggingface_hub 1.x/2.x, read from its ``hf_api.py`` and ``_commit_api.py``):

* ``POST /api/repos/create``                         JSON ``{name, organization, visibility, type}``
* ``POST /api/{type}s/{ns}/{name}/preupload/{rev}``  JSON ``{files: [{path, sample, size}]}``
* ``POST /api/{type}s/{ns}/{name}/commit/{rev}``     ndjson: a ``header`` line, then ``file`` lines
  with base64 content (or ``lfsFile`` / ``deletedFile`` lines)
* ``POST /api/validate-yaml``                        (only when a README.md is uploaded)
* ``GET  /api/whoami-v2``, ``GET /api/{type}s/{ns}/{name}[/revision/{rev}]``  (if ever called)

Preupload answers ``"uploadMode": "regular"`` for every file, which a Hub server may legitimately
do; the client then sends the bytes inline in the commit, so no LFS/xet storage is needed. Files of
an ``lfsFile`` line are refused (the server never asked for LFS).

Every request is recorded (method, path, headers) so tests can check what the client sent. A
request whose ``Authorization`` is not ``Bearer <token>`` gets 401 with a body that *echoes the
header back* — a hostile server, to check that the client never shows the token it sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    repo_type: str
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)   # {summary, description, oid, paths}


class FakeHub:
    """Threaded HTTP server on 127.0.0.1 (random port). Use as a context manager.

    Args:
        token: the only token the server accepts.
    """

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[dict] = []
        self.create_payloads: list[dict] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # keep test output clean
                return None

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ dispatch
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append({"method": method, "path": path, "query": url.query,
                                  "headers": {k.lower(): v for k, v in h.headers.items()}})
        auth = h.headers.get("Authorization", "")
        if auth != f"Bearer {self.token}":
            # hostile echo: the error message contains whatever credential was sent
            return self._send(h, 401, {"error": f"Invalid credentials in Authorization header: {auth!r}"})
        try:
            status, payload = self._route(method, path, body)
        except Exception as err:    # a bug in the fake shows up as a 500 with the reason
            status, payload = 500, {"error": f"fake hub: {type(err).__name__}: {err}"}
        self._send(h, status, payload)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        m = re.fullmatch(_REPO + r"/(?P<op>preupload|commit)/(?P<rev>[^/]+)", path)
        if m and method == "POST":
            repo = self.repos.get(m["repo"])
            if repo is None:
                return 404, {"error": "Repository not found"}
            if m["op"] == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]}
            return self._commit(repo, body)
        m = re.fullmatch(_REPO + r"(?:/revision/(?P<rev>[^/]+))?", path)
        if m and method == "GET" and m["repo"] in self.repos:
            repo = self.repos[m["repo"]]
            sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
            return 200, {"id": repo.repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
        return 404, {"error": f"fake hub has no route {method} {path}"}

    def _create(self, payload: dict) -> tuple[int, dict]:
        self.create_payloads.append(payload)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo_id] = FakeRepo(repo_id, private=payload.get("visibility") == "private",
                                       repo_type=payload.get("type") or "model")
        return 200, {"url": url}

    def _commit(self, repo: FakeRepo, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        staged: dict[str, bytes] = {}
        for item in lines:
            if item["key"] == "file":
                v = item["value"]
                assert v.get("encoding") == "base64", v
                staged[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                return 400, {"error": "LFS file referenced but preupload asked for regular upload"}
            elif item["key"] == "deletedFile":
                repo.files.pop(item["value"]["path"], None)
        repo.files.update(staged)
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"summary": header["summary"], "description": header.get("description", ""),
                             "oid": oid, "paths": sorted(staged)})
        return 200, {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}
