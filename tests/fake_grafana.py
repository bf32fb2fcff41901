"""A loopback HTTP server that answers like Grafana's HTTP API (folders, data sources by uid
with their health check, dashboards/db) and records every request: the stand-in for a Grafana
server, which cannot be installed here (tests/dashboards/test_push_contract.py is its contract
test; tests/test_bad_input_catalogue.py uses it for an absent Prometheus)."""
from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FakeGrafana:
    """What the server holds, what it was asked, and how it should fail (None, 401 or 500)."""
    fail_with: int | None = None
    prefix: str = ""
    # What the data-source health check finds: up, down, or None to query the data source's URL
    # as Grafana's Prometheus plugin does.
    prometheus_up: bool | None = True
    folders: dict = field(default_factory=dict)
    datasources: dict = field(default_factory=dict)
    dashboards: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)

    def answer(self, method: str, path: str, body) -> tuple[int, dict]:
        if self.fail_with == 401:
            return 401, {"message": "invalid API key"}
        if self.fail_with == 500:
            return 500, {"message": "database is locked"}
        if not path.startswith(self.prefix + "/api/"):
            return 404, {"message": "not found"}
        parts = path[len(self.prefix) + len("/api/"):].split("/")
        if parts[0] == "folders":
            if method == "DELETE" and len(parts) == 2:
                return (200, {"message": "Folder deleted"}) if self.folders.pop(parts[1], None) else (404, {})
            if method == "GET" and len(parts) == 2:
                found = self.folders.get(parts[1])
                return (200, found) if found else (404, {"message": "folder not found"})
            if method == "POST" and len(parts) == 1:
                if body["uid"] in self.folders:
                    return 409, {"message": "a folder with the same uid already exists"}
                self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"], "id": len(self.folders) + 1}
                return 200, self.folders[body["uid"]]
        if parts[0] == "datasources":
            if len(parts) == 4 and parts[1] == "uid" and parts[3] == "health" and method == "GET":
                if parts[2] not in self.datasources:
                    return 404, {"message": "Data source not found"}
                if self.prometheus_up is None:
                    return query_health(self.datasources[parts[2]]["url"])
                if self.prometheus_up:  # Grafana's answers (pkg/api/plugins.go CheckHealth)
                    return 200, {"status": "OK", "message": "Successfully queried the Prometheus API."}
                return 400, {"status": "ERROR", "message": "dial tcp 127.0.0.1:9090: connect: connection refused"}
            if len(parts) == 3 and parts[1] == "uid":
                uid = parts[2]
                if method == "DELETE":
                    return (200, {"message": "Data source deleted"}) if self.datasources.pop(uid, None) else (404, {})
                if method == "GET":
                    found = self.datasources.get(uid)
                    return (200, found) if found else (404, {"message": "Data source not found"})
                if method == "PUT":
                    if uid not in self.datasources:
                        return 404, {"message": "Data source not found"}
                    self.datasources[uid] = {**self.datasources[uid], **body}
                    return 200, {"message": "Datasource updated", "datasource": self.datasources[uid]}
            if method == "POST" and len(parts) == 1:
                names = {d["name"] for d in self.datasources.values()}
                if body["uid"] in self.datasources or body["name"] in names:
                    return 409, {"message": "data source with the same name already exists"}
                self.datasources[body["uid"]] = {**body, "id": len(self.datasources) + 1, "readOnly": False}
                return 200, {"message": "Datasource added", "datasource": self.datasources[body["uid"]]}
        if parts == ["dashboards", "db"] and method == "POST":
            uid = body["dashboard"]["uid"]
            if uid in self.dashboards and not body.get("overwrite"):
                return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
            version = self.dashboards.get(uid, {}).get("version", 0) + 1
            self.dashboards[uid] = {**body, "version": version}
            return 200, {"status": "success", "uid": uid, "version": version, "url": f"{self.prefix}/d/{uid}/robustness"}
        return 404, {"message": "not found"}


def query_health(url: str) -> tuple[int, dict]:
    """Grafana's Prometheus health check: a query to the data source's URL."""
    try:
        urllib.request.urlopen(f"{url}/api/v1/query?query=1%2B1", timeout=2).close()
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        return 400, {"status": "ERROR", "message": f'Post "{url}/api/v1/query": {reason} - There was an error '
                                                   "returned querying the Prometheus API."}
    return 200, {"status": "OK", "message": "Successfully queried the Prometheus API."}


def serve(state: FakeGrafana) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve `state` on a free loopback port (a daemon thread); the caller shuts it down."""
    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            state.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                   "body": body})
            status, payload = state.answer(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread
