"""A loopback stand-in for the Hugging Face Hub: just enough of its HTTP API for the real
huggingface_hub client to create a repo, upload a folder (regular, non-LFS uploads) and download it
back with snapshot_download. Repos live in memory."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # "model/owner/name" -> {path: content}
        self.commits: dict[str, str] = {}
        self.private: dict[str, bool] = {}
        self.tokens_seen: list[str | None] = []
        self.validated: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, payload, status=200, headers=None):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                hub.tokens_seen.append(self.headers.get("Authorization"))
                body = self._body()
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    kind = data.get("type") or "model"
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    key = f"{kind}/{repo_id}"
                    hub.repos.setdefault(key, {})
                    hub.commits.setdefault(key, "0" * 40)
                    hub.private[key] = bool(data.get("private")) or data.get("visibility") == "private"
                    return self._json({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if self.path == "/api/validate-yaml":  # the client checks a README's metadata before a commit
                    hub.validated.append(json.loads(body).get("content", ""))
                    return self._json({"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/(models|datasets)/(.+)/(preupload|commit)/([^/]+)", self.path)
                if not match:
                    return self._json({"error": f"not served: POST {self.path}"}, 404)
                kind, repo_id, action = match.group(1)[:-1], match.group(2), match.group(3)
                key = f"{kind}/{repo_id}"
                if key not in hub.repos:
                    return self._json({"error": "repo not found"}, 404)
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        hub.repos[key][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        hub.repos[key].pop(item["value"]["path"], None)
                digest = hashlib.sha1(
                    json.dumps(sorted((p, hashlib.sha1(c).hexdigest()) for p, c in hub.repos[key].items())).encode()
                ).hexdigest()
                hub.commits[key] = digest
                return self._json({"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{digest}", "commitOid": digest})

            def _file(self, head: bool):
                match = re.fullmatch(r"/(datasets/)?(.+?/.+?)/resolve/([^/]+)/(.+)", self.path)
                if not match:
                    return None
                key = f"{'dataset' if match.group(1) else 'model'}/{match.group(2)}"
                content = hub.repos.get(key, {}).get(match.group(4))
                if content is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
                self.send_header("X-Repo-Commit", hub.commits[key])
                self.end_headers()
                if not head:
                    self.wfile.write(content)
                return True

            def do_HEAD(self):
                if self._file(head=True) is None:
                    self.send_response(404)
                    self.end_headers()

            def do_GET(self):
                hub.tokens_seen.append(self.headers.get("Authorization"))
                tree = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/[^/?]+(\?.*)?", self.path)
                if tree:
                    files = hub.repos.get(f"{tree.group(1)[:-1]}/{tree.group(2)}", {})
                    return self._json(
                        [
                            {
                                "type": "file",
                                "path": path,
                                "size": len(content),
                                "oid": hashlib.sha1(content).hexdigest(),
                            }
                            for path, content in sorted(files.items())
                        ]
                    )
                match = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(/revision/[^/?]+)?(\?.*)?", self.path)
                if match:
                    key = f"{match.group(1)[:-1]}/{match.group(2)}"
                    if key not in hub.repos:
                        return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
                    return self._json(
                        {
                            "id": match.group(2),
                            "sha": hub.commits[key],
                            "private": hub.private[key],
                            "siblings": [{"rfilename": path} for path in sorted(hub.repos[key])],
                        }
                    )
                if self._file(head=False) is None:
                    self._json({"error": f"not served: GET {self.path}"}, 404)

        return Handler
