"""Contract test of `msa-search dashboards push`: a loopback HTTP server that answers like Grafana's
HTTP API (folders, data sources by uid, dashboards/db) and records every request, so the test
sees exactly what grafana-client sends: the token header, the folder, the data source created
then updated in place, the dashboard saved with overwrite under its uid. Failures (nothing
listening, a refused token, a server error) must each give one line and a non-zero exit."""
from __future__ import annotations

import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from search import cli, dashboards

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "glsa_contract_test_token"


@dataclass
class FakeGrafana:
    """What the server holds, what it was asked, and how it should fail (None, 401 or 500)."""
    fail_with: int | None = None
    prefix: str = ""
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
            if method == "GET" and len(parts) == 2:
                found = self.folders.get(parts[1])
                return (200, found) if found else (404, {"message": "folder not found"})
            if method == "POST" and len(parts) == 1:
                if body["uid"] in self.folders:
                    return 409, {"message": "a folder with the same uid already exists"}
                self.folders[body["uid"]] = {"uid": body["uid"], "title": body["title"], "id": len(self.folders) + 1}
                return 200, self.folders[body["uid"]]
        if parts[0] == "datasources":
            if len(parts) == 3 and parts[1] == "uid":
                uid = parts[2]
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


@pytest.fixture
def grafana():
    """A fake Grafana on a free loopback port; yields (state, base URL)."""
    state = FakeGrafana()

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
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def push(monkeypatch, capsys):
    """Runs `msa-search dashboards push ...` in this process; returns (exit code, stdout, stderr)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # the loopback server must be reached directly

    def run(*args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
        if token is None:
            monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
        else:
            monkeypatch.setenv("GRAFANA_TOKEN", token)
        monkeypatch.setattr(sys, "argv", ["msa-search", "dashboards", "push", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_push_contract_sends_folder_datasource_and_dashboard_with_the_token(grafana, push):
    state, url = grafana
    code, out, err = push("--url", url, "--prometheus-url", "http://prometheus:9090")
    assert code == 0, err
    assert state.requests and all(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in state.requests)
    calls = [(r["method"], r["path"]) for r in state.requests]
    assert calls == [("GET", "/api/folders/msa-search"), ("POST", "/api/folders"),
                     ("GET", "/api/datasources/uid/msa-prometheus"), ("POST", "/api/datasources"),
                     ("POST", "/api/dashboards/db")]
    assert state.folders["msa-search"]["title"] == dashboards.FOLDER_TITLE
    datasource = state.datasources["msa-prometheus"]
    assert (datasource["type"], datasource["url"], datasource["access"]) == ("prometheus", "http://prometheus:9090",
                                                                             "proxy")
    saved = state.requests[-1]["body"]
    assert saved["overwrite"] is True and saved["folderUid"] == "msa-search"
    committed = json.loads((ROOT / "dashboards" / dashboards.DASHBOARD_FILE).read_text(encoding="utf-8"))
    assert saved["dashboard"] == committed and saved["dashboard"]["uid"] == dashboards.DASHBOARD_UID
    assert "folder created" in out and "data source created" in out and f"{url}/d/msa-robustness/" in out


def test_push_contract_is_idempotent(grafana, push):
    state, url = grafana
    assert push("--url", url)[0] == 0
    first = len(state.requests)
    code, out, err = push("--url", url)
    assert code == 0, err
    again = [(r["method"], r["path"]) for r in state.requests[first:]]
    assert again == [("GET", "/api/folders/msa-search"), ("GET", "/api/datasources/uid/msa-prometheus"),
                     ("PUT", "/api/datasources/uid/msa-prometheus"), ("POST", "/api/dashboards/db")]
    assert len(state.folders) == len(state.datasources) == len(state.dashboards) == 1
    assert state.dashboards[dashboards.DASHBOARD_UID]["version"] == 2
    assert "folder found" in out and "data source updated" in out


def test_push_contract_leaves_a_provisioned_datasource_alone(grafana, push):
    state, url = grafana
    state.datasources["msa-prometheus"] = {"uid": "msa-prometheus", "name": dashboards.DATASOURCE_NAME,
                                           "type": "prometheus", "readOnly": True}
    code, out, err = push("--url", url)
    assert code == 0, err
    assert not any(r["method"] == "PUT" for r in state.requests) and "provisioned" in out


def test_push_contract_keeps_a_url_path_prefix(grafana, push):
    state, url = grafana
    state.prefix = "/grafana"
    code, out, err = push("--url", url + "/grafana")
    assert code == 0, err
    assert all(r["path"].startswith("/grafana/api/") for r in state.requests)
    assert f"{url}/grafana/d/msa-robustness/" in out


def test_push_to_a_dead_port_fails_with_one_line(push):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = push("--url", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert code == 1
    line = _one_error_line(err)
    assert f"cannot reach Grafana at http://127.0.0.1:{port}" in line


def test_push_with_a_refused_token_fails_with_one_line(grafana, push):
    state, url = grafana
    state.fail_with = 401
    code, out, err = push("--url", url)
    assert code == 1
    line = _one_error_line(err)
    assert "401" in line and "GRAFANA_TOKEN" in line and TOKEN not in line
    assert len(state.requests) == 1, "gives up at the first refusal"


def test_push_on_a_server_error_fails_with_one_line(grafana, push):
    state, url = grafana
    state.fail_with = 500
    code, out, err = push("--url", url)
    assert code == 1
    line = _one_error_line(err)
    assert "server error 500" in line and "database is locked" in line


def test_push_without_a_token_fails_before_any_request(grafana, push):
    state, url = grafana
    code, out, err = push("--url", url, token=None)
    assert code == 1
    assert "GRAFANA_TOKEN is not set" in _one_error_line(err)
    assert state.requests == []


def test_push_refuses_a_user_and_password_in_the_url(grafana, push):
    state, url = grafana
    code, out, err = push("--url", url.replace("http://", "http://admin:admin@"))
    assert code == 1
    line = _one_error_line(err)
    assert "GRAFANA_TOKEN" in line and "admin:admin" not in line
    assert state.requests == []
