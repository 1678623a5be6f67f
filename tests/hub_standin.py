"""A local stand-in for the part of the Hugging Face Hub's HTTP API that creating a
dataset repo and pushing files to it uses, on 127.0.0.1, in a background thread.

It keeps repos in memory (path -> bytes, one commit history per repo).  Markdown files
are committed inline ("regular"); others go through the LFS batch API with the "basic"
transfer (a PUT of the whole file, checked against its sha256).  It does not speak Xet:
clients must run with ``HF_HUB_DISABLE_XET=1``.  Requests it does not know are recorded
in ``unknown`` and answered 404.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from typing import Any

from aiohttp import web


class HubStandIn:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, list[str]] = {}
        self.unknown: list[str] = []
        self.blobs: dict[str, bytes] = {}
        self.auth_seen: set[str] = set()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    # -- life cycle

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    # -- the API

    def _sha(self, repo: str) -> str:
        history = self.commits.get(repo) or ["0" * 40]
        return history[-1]

    def _repo(self, parts: list[str]) -> tuple[str, list[str]]:
        return f"{parts[0]}/{parts[1]}", parts[2:]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.auth_seen.add(request.headers.get("Authorization", ""))
        path = request.path
        parts = [p for p in path.split("/") if p]
        method = request.method
        if path == "/api/repos/create" and method == "POST":
            body = await request.json()
            repo = f"{body.get('organization') or 'user'}/{body['name']}"
            if "/" in body["name"]:
                repo = body["name"]
            self.repos.setdefault(repo, {})
            return web.json_response({"url": f"{self.url}/datasets/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            return web.json_response({"errors": [], "warnings": []})
        if path == "/api/agent-harnesses":
            return web.json_response({"standardEnvVars": [], "harnesses": {}})
        if path == "/api/whoami-v2":
            return web.json_response({"name": "user", "type": "user", "orgs": []})
        if parts[:1] == ["datasets"] and parts[-4:] == ["info", "lfs", "objects", "batch"]:
            body = await request.json()
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}},
                }
                for o in body["objects"]
            ]
            return web.json_response({"transfer": "basic", "objects": objects})
        if parts[:1] == ["lfs-upload"] and method == "PUT":
            data = await request.read()
            if hashlib.sha256(data).hexdigest() != parts[1]:
                return web.Response(status=400, text="sha256 mismatch")
            self.blobs[parts[1]] = data
            return web.Response(status=200)
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
            repo, rest = self._repo(parts[2:])
            if repo not in self.repos:
                return self._missing("RepoNotFound")
            return await self._api(request, repo, rest)
        if parts[:1] == ["datasets"] and len(parts) >= 5 and parts[3] == "resolve":
            repo = f"{parts[1]}/{parts[2]}"
            file_path = "/".join(parts[5:])
            found = self.repos.get(repo, {}).get(file_path)
            if found is None:
                return self._missing("EntryNotFound")
            data = found
            etag = hashlib.sha1(data).hexdigest()
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": self._sha(repo)}
            if method == "HEAD":
                headers["Content-Length"] = str(len(data))
                return web.Response(status=200, headers=headers)
            return web.Response(body=data, headers=headers)
        self.unknown.append(f"{method} {request.path_qs}")
        return web.Response(status=404)

    def _missing(self, code: str) -> web.Response:
        return web.json_response({"error": code}, status=404, headers={"X-Error-Code": code})

    def _entry(self, repo: str, path: str) -> dict[str, Any]:
        data = self.repos[repo][path]
        return {
            "type": "file",
            "path": path,
            "size": len(data),
            "oid": hashlib.sha1(data).hexdigest(),
        }

    def _tree(self, repo: str, prefix: str, recursive: bool) -> web.Response:
        base = prefix + "/" if prefix else ""
        inside = [p for p in sorted(self.repos[repo]) if p.startswith(base)]
        if prefix and not inside:
            return self._missing("EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for p in inside:
            parts = p[len(base) :].split("/")
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folder = base + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder, "size": 0, "oid": "0" * 40}
            if recursive or len(parts) == 1:
                entries[p] = self._entry(repo, p)
        return web.json_response(list(entries.values()))

    async def _api(self, request: web.Request, repo: str, rest: list[str]) -> web.StreamResponse:
        files = self.repos[repo]
        if not rest or rest[0] == "revision":
            siblings = [{"rfilename": p} for p in sorted(files)]
            return web.json_response(
                {"id": repo, "sha": self._sha(repo), "siblings": siblings, "private": False}
            )
        if rest[0] == "preupload":
            body = await request.json()
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "regular" if f["path"].endswith(".md") else "lfs",
                    "shouldIgnore": False,
                }
                for f in body["files"]
            ]
            return web.json_response({"files": modes, "commitOid": self._sha(repo)})
        if rest[0] == "commit":
            raw = await request.read()
            for line in raw.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    files[value["path"]] = self.blobs[value["oid"]]
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    for p in [
                        p
                        for p in files
                        if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")
                    ]:
                        del files[p]
                elif item["key"] != "header":
                    self.unknown.append(f"commit op {item['key']}")
            sha = hashlib.sha1(f"{repo}{len(self.commits.get(repo, []))}".encode()).hexdigest()
            self.commits.setdefault(repo, []).append(sha)
            return web.json_response(
                {
                    "commitUrl": f"{self.url}/datasets/{repo}/commit/{sha}",
                    "commitOid": sha,
                    "pullRequestUrl": None,
                }
            )
        if rest[0] == "tree":
            prefix = "/".join(rest[2:])
            recursive = request.query.get("recursive", "").lower() == "true"
            return self._tree(repo, prefix, recursive)
        if rest[0] == "paths-info":
            form = await request.post()
            wanted = form.getall("paths") if "paths" in form else []
            return web.json_response([self._entry(repo, str(p)) for p in wanted if str(p) in files])
        self.unknown.append(f"{request.method} {request.path_qs}")
        return web.Response(status=404)
