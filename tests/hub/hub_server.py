"""A tiny in-memory stand-in for the Hugging Face Hub HTTP API, for tests only (listens on 127.0.0.1).

It implements just the endpoints that huggingface_hub's upload and download code calls when Xet is disabled
(``HF_HUB_DISABLE_XET=1``): create repo, create branch, repo info, preupload (every file "regular", so no LFS or
Xet transfer), commit (NDJSON lines with base64 file contents; ``create_pr`` opens ``refs/pr/N``), and resolve
(HEAD/GET with the ``ETag``, ``X-Repo-Commit`` and ``Content-Length`` headers that ``hf_hub_download`` reads).
Writes need an ``Authorization`` header (any token); nothing else about the real Hub (permissions, LFS, Xet,
gating) is imitated. The client under test is the real ``huggingface_hub``, pointed here with ``HF_ENDPOINT``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file: what the Hub sends as ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    files: dict[str, bytes]
    parent: str | None
    message: str


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", other branches, "refs/pr/N" -> commit

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None

    def pull_requests(self) -> list[str]:
        return sorted(r for r in self.refs if r.startswith("refs/pr/"))


class HubStandIn:
    """Run with ``with HubStandIn() as hub: ... hub.url ...``; inspect ``hub.repos`` and ``hub.log``."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.lock = threading.Lock()
        self._counter = 0
        hub = self

        class Handler(_Handler):
            stand_in = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ----------------------------------------------------------------------------------- repository state
    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str) -> str:
        self._counter += 1
        digest = hashlib.sha1(f"{parent}|{message}|{self._counter}".encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha1(files[path]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(dict(files), parent, message)
        return sha

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(private=private)
        # Like the Hub, a new repo starts with one commit holding .gitattributes.
        repo.refs["main"] = self.new_commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)].files


class _Handler(BaseHTTPRequestHandler):
    stand_in: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # ----------------------------------------------------------------------------------- plumbing
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, send_body: bool = True):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if send_body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict, headers: dict | None = None):
        self._reply(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        return self.body

    def _segments(self):
        parts = urlsplit(self.path)
        return [unquote(s) for s in parts.path.strip("/").split("/")], parse_qs(parts.query)

    def _authorized(self) -> bool:
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.stand_in.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    # ----------------------------------------------------------------------------------- routing
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        seg, query = self._segments()
        hub = self.stand_in
        # Read the whole request body first: an error reply must not leave bytes behind on a kept-alive connection.
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with hub.lock:
            hub.log.append((method, urlsplit(self.path).path))
            try:
                if method == "POST" and seg[:3] == ["api", "repos", "create"]:
                    return self._create_repo()
                if len(seg) >= 4 and seg[:2] == ["api", "models"]:
                    repo_id = f"{seg[2]}/{seg[3]}"
                    rest = seg[4:]
                    if method == "GET" and not rest:
                        return self._repo_info(repo_id, "main")
                    if method == "GET" and rest[:1] == ["revision"] and len(rest) == 2:
                        return self._repo_info(repo_id, rest[1])
                    if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
                        return self._create_branch(repo_id, rest[1])
                    if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                        return self._preupload(repo_id, rest[1], query)
                    if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                        return self._commit(repo_id, rest[1], query)
                if method in ("HEAD", "GET") and len(seg) >= 5 and seg[2] == "resolve":
                    return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
                self._error(404, None, f"the Hub stand-in does not implement {method} {self.path}")
            except Exception as e:  # noqa: BLE001 -- a bug here must fail the test loudly, not hang the client
                self._error(500, None, f"stand-in error: {type(e).__name__}: {e}")

    # ----------------------------------------------------------------------------------- endpoints
    def _create_repo(self):
        if not self._authorized():
            return
        payload = json.loads(self._body() or b"{}")
        if payload.get("type") not in (None, "model"):
            return self._error(400, None, "the stand-in hosts model repos only")
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.stand_in.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.stand_in.url}/{repo_id}"})
        self.stand_in.create_repo(repo_id, private=payload.get("visibility") == "private")
        self._json(200, {"url": f"{self.stand_in.url}/{repo_id}", "name": repo_id})

    def _commit_at(self, repo_id: str, revision: str):
        """``(repo, sha)``, or None after replying 404 (unknown repo or revision)."""
        repo = self._repo(repo_id)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def _repo_info(self, repo_id: str, revision: str):
        found = self._commit_at(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        siblings = [{"rfilename": p} for p in sorted(repo.commits[sha].files)]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings})

    def _create_branch(self, repo_id: str, branch: str):
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo.refs:
            return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        sha = repo.resolve(start)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {start}")
        repo.refs[branch] = sha
        self._json(200, {})

    def _preupload(self, repo_id: str, revision: str, query):
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = repo.resolve("main" if query.get("create_pr") else revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        existing = repo.commits[sha].files
        files = []
        for f in json.loads(self._body())["files"]:
            oid = git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": sha})

    def _commit(self, repo_id: str, revision: str, query):
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        create_pr = bool(query.get("create_pr"))
        parent = repo.resolve("main" if create_pr else revision)
        if parent is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if not create_pr and revision not in repo.refs:
            return self._error(400, None, f"cannot commit to {revision}: not a branch")
        files = dict(repo.commits[parent].files)
        message = ""
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
                if value.get("parentCommit") and value["parentCommit"] != parent:
                    return self._error(412, None, "parent commit is not the head of the branch")
            elif item["key"] == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, "file contents must be base64")
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                return self._error(400, None, f"the stand-in does not support {item['key']!r} operations")
        sha = self.stand_in.new_commit(repo, parent, files, message)
        pr_url = None
        if create_pr:
            number = len(repo.pull_requests()) + 1
            repo.refs[f"refs/pr/{number}"] = sha
            pr_url = f"{self.stand_in.url}/{repo_id}/discussions/{number}"
        else:
            repo.refs[revision] = sha
        self._json(200, {"commitUrl": f"{self.stand_in.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url})

    def _resolve(self, repo_id: str, revision: str, path: str):
        found = self._commit_at(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        data = repo.commits[sha].files.get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}")
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}
        self._reply(200, data, headers)
