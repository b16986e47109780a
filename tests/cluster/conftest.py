"""A small Kubernetes API server for the client tests: the real ``kubernetes`` client talks HTTP to
it, every request is recorded (method, path, query, content type, JSON body), and responses follow
the API server's conventions (201 on create, 409 AlreadyExists, 404 NotFound Status objects,
RFC 7386 merge patches). Status progressions are scripted from KubeRay's status fields."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest


def _load_top_conftest():
    # Tests here import "conftest" as this file; run_cli lives in tests/conftest.py.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "raylane_tests_conftest", Path(__file__).parents[1] / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_cli = _load_top_conftest().run_cli


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class FakeKube:
    def __init__(self):
        self.requests: list[Request] = []
        self.objects: dict[str, dict] = {}  # item path -> object
        self.status_script: dict[
            str, list[dict]
        ] = {}  # item path -> statuses served on successive GETs
        self.pods: dict[str, list[dict]] = {}  # label selector -> pods
        self.pod_logs: dict[str, str] = {}  # pod name -> log text
        self.fail: dict[tuple[str, str], tuple[int, str]] = {}  # (method, path) -> (code, message)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def kubeconfig(self, path: Path, namespace: str = "team") -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "me", "user": {"token": "t0ken"}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "me", "namespace": namespace},
                        }
                    ],
                }
            )
        )
        return path

    def _status(self, code: int, reason: str, message: str) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, Any]:
        url = urlparse(raw_path)
        path, query = url.path, parse_qs(url.query)
        data = json.loads(body) if body else None
        self.requests.append(Request(method, path, query, headers.get("Content-Type"), data))
        if (method, path) in self.fail:
            code, msg = self.fail[(method, path)]
            return code, self._status(code, "Forbidden" if code == 403 else "Invalid", msg)
        if path.endswith("/log"):
            name = path.split("/")[-2]
            return 200, self.pod_logs.get(name, "")
        if method == "GET" and path.endswith("/pods"):
            sel = query.get("labelSelector", [""])[0]
            return 200, {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {},
                "items": self.pods.get(sel, []),
            }
        if method == "POST":
            name = data["metadata"]["name"]
            item = f"{path}/{name}"
            if item in self.objects:
                kind = path.rsplit("/", 1)[-1]
                return 409, self._status(409, "AlreadyExists", f'{kind} "{name}" already exists')
            obj = json.loads(json.dumps(data))
            obj["metadata"].update(
                uid=f"uid-{len(self.objects)}",
                resourceVersion="1",
                creationTimestamp="2026-11-22T23:00:00Z",
            )
            self.objects[item] = obj
            return 201, obj
        obj = self.objects.get(path)
        if obj is None:
            kind, name = path.rsplit("/", 2)[-2:]
            return 404, self._status(404, "NotFound", f'{kind} "{name}" not found')
        if method == "GET":
            script = self.status_script.get(path)
            if script:
                obj["status"] = script.pop(0) if len(script) > 1 else script[0]
            return 200, obj
        if method == "PATCH":
            self.objects[path] = merge_patch(obj, data)
            return 200, self.objects[path]
        if method == "DELETE":
            del self.objects[path]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
        return 405, self._status(405, "MethodNotAllowed", method)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                code, payload = fake.handle(
                    self.command, self.path, self.headers, self.rfile.read(n) if n else b""
                )
                raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header(
                    "Content-Type", "text/plain" if isinstance(payload, str) else "application/json"
                )
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_kube():
    fk = FakeKube()
    yield fk
    fk.close()


@pytest.fixture
def kuberay(fake_kube):
    """The real client, pointed at the fake API server through a real kubeconfig file."""
    import tempfile

    from cluster.client import KubeRay

    with tempfile.TemporaryDirectory() as d:
        cfg = fake_kube.kubeconfig(Path(d) / "kubeconfig")
        yield KubeRay.connect(kubeconfig=str(cfg))
