"""A small local stand-in for the Hugging Face Hub, so the download stage runs real huggingface_hub code offline.

The hub is unreachable from the test machines, and mocking huggingface_hub's functions would test our
assumptions instead of the library. This server speaks the part of the hub's HTTP protocol that
huggingface_hub 2.4.0 uses for ``HfApi.dataset_info``, ``HfApi.list_repo_tree`` and ``hf_hub_download``
(plain HTTP, no Xet), plus a plain file host for the ``http`` source kind. Point ``HF_ENDPOINT`` at
``HubServer.endpoint``.

Routes (``{rev}`` is a branch, tag or commit sha, percent-encoded as the client sends it):

- ``GET /api/datasets/{repo}[/revision/{rev}]`` → ``{"id", "sha", "siblings", ...}`` (``sha`` = resolved commit)
- ``GET /api/datasets/{repo}/tree/{rev}[/{path}]?recursive=..&cursor=..`` → one page of
  ``{"type": "file"|"directory", "oid", "size", "path", "lfs": {"oid", "size", "pointerSize"}}``,
  ``Link: <next>; rel="next"`` while more pages remain (``page_size`` entries per page)
- ``HEAD|GET /datasets/{repo}/resolve/{rev}/{path}``: always ``X-Repo-Commit``. A regular (non-LFS) file
  answers 200 with ``ETag: "<git blob sha1>"`` and the bytes. An LFS file answers 302 with
  ``X-Linked-Etag: "<sha256>"``, ``X-Linked-Size`` and ``Location`` on the CDN origin (a second port, so the
  client treats it as a foreign host: it stops the HEAD there and drops the Authorization header, as with
  the real hub's signed CDN URLs). Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
  EntryNotFound) like the hub.
- CDN origin: ``GET|HEAD /cdn/{sha256}`` (LFS blobs by content) and ``/files/{path}`` (``http`` source
  files), both with ``Range: bytes=N-`` → 206 + ``Content-Range``. ``/files`` answers also carry
  ``Repr-Digest: sha-256=:<base64>:`` (RFC 9530), the digest of the whole file, as a server that
  publishes one does.

Model repos (``HubServer.models``; the released open-sci-ref checkpoints are model repos with one
branch per saved iteration), for ``HfApi.list_repo_refs``, ``HfApi.list_models``, ``HfApi.model_info``,
``list_repo_tree`` and ``hf_hub_download`` of a model:

- ``GET /api/{models|datasets}/{repo}/refs`` → ``{"branches": [{"name", "ref", "targetCommit"}], "tags": [...],
  "converts": []}`` from ``Repo.refs`` (branches) and ``Repo.tags``
- ``GET /api/models?author=..&search=..`` → ``[{"id", "_id", "modelId"}]``: the model repos of that author
  whose id contains the search text (what the hub's search does for a plain substring)
- ``GET /api/models/{repo}[/revision/{rev}]``, ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and
  ``HEAD|GET /{repo}/resolve/{rev}/{path}``: as for datasets (models have no URL prefix)

Fault injection, per repo-relative (or ``/files``-relative) path:

- ``cut_after[path] = (n_bytes, times)``: the first ``times`` body transfers send full headers, then
  only ``n_bytes`` of the body, then close the connection;
- ``stall_after[path] = (n_bytes, times)``: the same, but the connection then hangs until the server
  stops (to kill a client mid-file);
- ``corrupt[path] = times``: the first ``times`` body transfers send the right length of wrong bytes
  (use a large number for "always");
- ``throttle[path] = (status, retry_after, times)``: the first ``times`` requests (GET or HEAD) of a
  ``/files`` path answer ``status`` (429, 503, ...) with ``Retry-After: retry_after`` (seconds or an
  HTTP date; None sends no header);
- ``file_headers[path] = {name: value}``: extra or replaced response headers of a ``/files`` path
  (e.g. ``Content-Type: text/html``, an S3-style md5 ``ETag``); a value of None drops the header;
- ``required_token``: every hub route (not the CDN, whose URLs are "signed") answers 401 without
  ``Authorization: Bearer <token>``;
- ``requests``: every request as ``RecordedRequest`` (origin, method, path, headers, file served,
  arrival time on ``time.monotonic``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlsplit

_INVERT_BYTES = bytes(255 - b for b in range(256))


@functools.cache  # every request needs the ids of multi-MB blobs; compute each once
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id


@functools.cache
def lfs_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs_sha256(data)}\nsize {len(data)}\n".encode()


@dataclass
class Repo:
    """A dataset repo: commits as {sha: {path: bytes}}, refs as {name: sha}, and which paths are LFS."""

    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    lfs_suffixes: tuple[str, ...] = (".parquet", ".zst", ".zstd", ".gz")
    tags: dict[str, str] = field(default_factory=dict)  # tag name -> sha (refs holds the branches)

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision) or self.tags.get(revision)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(self.lfs_suffixes)


@dataclass
class RecordedRequest:
    origin: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased: clients differ in how they spell them
    file: str | None = None  # the repo (or /files) path whose bytes this request transferred
    at: float = field(default_factory=time.monotonic)  # when the request arrived


@dataclass
class HubServer:
    """Two threaded HTTP servers on 127.0.0.1 (hub + CDN origin) sharing the repos and the fault knobs."""

    repos: dict[str, Repo] = field(default_factory=dict)
    models: dict[str, Repo] = field(default_factory=dict)  # model repos (served without a URL prefix)
    files: dict[str, bytes] = field(default_factory=dict)  # served under the CDN origin's /files/
    page_size: int = 1000
    required_token: str | None = None
    cut_after: dict[str, tuple[int, int]] = field(default_factory=dict)
    stall_after: dict[str, tuple[int, int]] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)
    throttle: dict[str, tuple[int, str | None, int]] = field(default_factory=dict)
    file_headers: dict[str, dict[str, str | None]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._servers = [_QuietServer(("127.0.0.1", 0), _make_handler(self, origin)) for origin in ("hub", "cdn")]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_port}"

    def __enter__(self) -> HubServer:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def transfers(self, path: str) -> list[RecordedRequest]:
        """The GETs that sent (some of) the bytes of ``path``, in order."""
        return [r for r in self.requests if r.method == "GET" and r.file == path]

    def _take_fault(self, knob: dict, key: str) -> object | None:
        """Consume one use of a fault for ``key``; None once it is used up."""
        with self._lock:
            if key not in knob:
                return None
            value = knob[key]
            remaining = value[-1] if isinstance(value, tuple) else value  # the use count comes last
            if remaining <= 0:
                return None
            knob[key] = (*value[:-1], remaining - 1) if isinstance(value, tuple) else remaining - 1
            return value

    def _lfs_blob(self, sha256: str) -> tuple[str, bytes] | None:
        for repo in [*self.repos.values(), *self.models.values()]:
            for tree in repo.commits.values():
                for path, data in tree.items():
                    if lfs_sha256(data) == sha256:
                        return path, data
        return None


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that the tests kill or cut off reset their connections; that is expected, not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _make_handler(hub: HubServer, origin: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    Handler.origin = origin
    return Handler


class _HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer
    origin: str

    def log_message(self, format, *args):
        pass

    def do_HEAD(self):  # stdlib naming
        self._dispatch(send_body=False)

    def do_GET(self):
        self._dispatch(send_body=True)

    # ---- plumbing ---------------------------------------------------------------------------------

    def _dispatch(self, send_body: bool) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.record = RecordedRequest(self.origin, self.command, self.path, headers)
        self.hub.requests.append(self.record)
        url = urlsplit(self.path)
        if self.origin == "cdn":
            return self._serve_cdn(unquote(url.path), send_body)
        if self.hub.required_token and self.headers.get("Authorization") != f"Bearer {self.hub.required_token}":
            return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
        if match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/([^/]+))?", url.path):
            return self._dataset_info(unquote(match[1]), unquote(match[2] or "main"))
        if match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", url.path):
            return self._tree(unquote(match[1]), unquote(match[2]), unquote((match[3] or "/")[1:]), parse_qs(url.query))
        if match := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path):
            return self._resolve(unquote(match[1]), unquote(match[2]), unquote(match[3]), send_body)
        return self._model_routes(url, send_body)

    def _model_routes(self, url, send_body: bool) -> None:
        if match := re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/refs", url.path):
            return self._refs(match[1], unquote(match[2]))
        if url.path == "/api/models":
            return self._list_models(parse_qs(url.query))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", url.path):
            return self._dataset_info(unquote(match[1]), unquote(match[2] or "main"), kind="models")
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", url.path):
            return self._tree(
                unquote(match[1]), unquote(match[2]), unquote((match[3] or "/")[1:]), parse_qs(url.query), kind="models"
            )
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path):
            return self._resolve(unquote(match[1]), unquote(match[2]), unquote(match[3]), send_body, kind="models")
        return self._error(404, None, f"no route for {url.path}")

    def _send_headers(self, status: int, headers: dict[str, str], content_length: int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(content_length))
        self.end_headers()

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", send_body: bool = True) -> None:
        self._send_headers(status, headers, len(body))
        if send_body and body:
            self.wfile.write(body)

    def _json(self, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode())

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
        self._send(status, {"Content-Type": "application/json", **extra}, json.dumps({"error": message}).encode())

    def _repo_and_commit(self, repo_id: str, revision: str, kind: str = "datasets") -> tuple[Repo, str] | None:
        repo = (self.hub.models if kind == "models" else self.hub.repos).get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    # ---- hub API ----------------------------------------------------------------------------------

    def _refs(self, kind: str, repo_id: str) -> None:
        repo = (self.hub.models if kind == "models" else self.hub.repos).get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")

        def entries(refs: dict[str, str], prefix: str) -> list[dict]:
            return [
                {"name": name, "ref": f"refs/{prefix}/{name}", "targetCommit": sha}
                for name, sha in sorted(refs.items())
            ]

        self._json({"branches": entries(repo.refs, "heads"), "converts": [], "tags": entries(repo.tags, "tags")})

    def _list_models(self, query: dict[str, list[str]]) -> None:
        author, search = query.get("author", [""])[0], query.get("search", [""])[0]
        found = [
            repo_id
            for repo_id in sorted(self.hub.models)
            if (not author or repo_id.split("/")[0] == author) and search.lower() in repo_id.lower()
        ]
        self._json([{"_id": hashlib.sha1(r.encode()).hexdigest()[:24], "id": r, "modelId": r} for r in found])

    def _dataset_info(self, repo_id: str, revision: str, kind: str = "datasets") -> None:
        if (found := self._repo_and_commit(repo_id, revision, kind)) is None:
            return
        repo, commit = found
        siblings = [{"rfilename": path} for path in sorted(repo.commits[commit])]
        self._json(
            {
                "_id": commit[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
                "lastModified": "2024-01-01T00:00:00.000Z",
                "createdAt": "2024-01-01T00:00:00.000Z",
            }
        )

    def _tree(
        self, repo_id: str, revision: str, folder: str, query: dict[str, list[str]], kind: str = "datasets"
    ) -> None:
        if (found := self._repo_and_commit(repo_id, revision, kind)) is None:
            return
        repo, commit = found
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = _tree_entries(repo, commit, folder, recursive)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            next_url = (
                f"{self.hub.endpoint}/api/{kind}/{repo_id}/tree/{quote(revision, safe='')}"
                f"{'/' + quote(folder) if folder else ''}?recursive={str(recursive).lower()}"
                f"&cursor={start + self.hub.page_size}"
            )
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(page, headers)

    def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool, kind: str = "datasets") -> None:
        if (found := self._repo_and_commit(repo_id, revision, kind)) is None:
            return
        repo, commit = found
        commit_header = {"X-Repo-Commit": commit}
        data = repo.commits[commit].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", commit_header)
        if repo.is_lfs(path):
            sha256 = lfs_sha256(data)
            return self._send(
                302,
                {
                    **commit_header,
                    "ETag": f'"{git_blob_sha1(data)}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                    "Location": f"{self.hub.cdn_url}/cdn/{sha256}?X-Amz-Signature=mock",
                },
            )
        self._body(path, data, {**commit_header, "ETag": f'"{git_blob_sha1(data)}"'}, send_body)

    # ---- CDN / file host --------------------------------------------------------------------------

    def _serve_cdn(self, path: str, send_body: bool) -> None:
        if match := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
            blob = self.hub._lfs_blob(match[1])
            if blob is None:
                return self._error(404, None, "no such blob")
            repo_path, data = blob
            return self._body(repo_path, data, {"ETag": f'"{match[1]}"'}, send_body)
        file_path = path.removeprefix("/files/")
        if path.startswith("/files/") and (data := self.hub.files.get(file_path)) is not None:
            if throttled := self.hub._take_fault(self.hub.throttle, file_path):
                status, retry_after, _ = throttled
                return self._error(
                    status, None, "slow down", {"Retry-After": str(retry_after)} if retry_after is not None else None
                )
            digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
            headers = {
                "ETag": f'"{lfs_sha256(data)}"',
                "Repr-Digest": f"sha-256=:{digest}:",
                **self.hub.file_headers.get(file_path, {}),
            }
            return self._body(file_path, data, headers, send_body)
        return self._error(404, None, f"no such file {path}")

    def _body(self, fault_key: str, data: bytes, headers: dict[str, str], send_body: bool) -> None:
        """Serve ``data`` (whole, or from ``Range: bytes=N-``), applying the faults registered for ``fault_key``."""
        self.record.file = fault_key
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        headers = {name: value for name, value in headers.items() if value is not None}
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(match[1])
            if start >= len(data):
                return self._error(416, None, "range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not send_body:
            return self._send_headers(status, headers, len(body))
        if self.hub._take_fault(self.hub.corrupt, fault_key):
            body = body.translate(_INVERT_BYTES)
        cut = self.hub._take_fault(self.hub.cut_after, fault_key)
        stall = self.hub._take_fault(self.hub.stall_after, fault_key)
        if cut or stall:
            self._send_headers(status, headers, len(body))
            self.wfile.write(body[: (cut or stall)[0]])
            self.wfile.flush()
            if stall:
                self.hub._stopping.wait(timeout=60)
            self.close_connection = True
            return None
        return self._send(status, headers, body)


def _tree_entries(repo: Repo, commit: str, folder: str, recursive: bool) -> list[dict]:
    """The hub's tree listing: directories and files under ``folder``, sorted by path like the hub."""
    prefix = f"{folder.rstrip('/')}/" if folder else ""
    entries: dict[str, dict] = {}
    for path, data in repo.commits[commit].items():
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :].split("/")
        depth = len(rest) if recursive else 1
        for level in range(1, min(depth, len(rest) - 1) + 1):
            directory = prefix + "/".join(rest[:level])
            tree_oid = hashlib.sha1(directory.encode()).hexdigest()  # any stable id will do
            entries[directory] = {"type": "directory", "oid": tree_oid, "size": 0, "path": directory}
        if recursive or len(rest) == 1:
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
            if repo.is_lfs(path):
                # as on the hub: the tree's oid of an LFS file is the git blob id of its pointer file
                entry["oid"] = git_blob_sha1(lfs_pointer(data))
                entry["lfs"] = {"oid": lfs_sha256(data), "size": len(data), "pointerSize": len(lfs_pointer(data))}
            entries[path] = entry
    return [entries[key] for key in sorted(entries)]
