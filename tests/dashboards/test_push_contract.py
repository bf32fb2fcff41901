"""Contract test of `msa-search dashboards push`: a loopback HTTP server that answers like Grafana's
HTTP API (folders, data sources by uid, dashboards/db) and records every request, so the test
sees exactly what grafana-client sends: the token header, the folder, the data source created
then updated in place, the dashboard saved with overwrite under its uid. Failures (nothing
listening, a refused token, a server error) must each give one line and a non-zero exit."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from search import cli, dashboards
from fake_grafana import FakeGrafana, serve

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "glsa_contract_test_token"


@pytest.fixture
def grafana():
    """A fake Grafana on a free loopback port; yields (state, base URL)."""
    state = FakeGrafana()
    server, thread = serve(state)
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
                     ("GET", "/api/datasources/uid/msa-prometheus/health"), ("POST", "/api/dashboards/db")]
    assert state.folders["msa-search"]["title"] == dashboards.FOLDER_TITLE
    datasource = state.datasources["msa-prometheus"]
    assert (datasource["type"], datasource["url"], datasource["access"]) == ("prometheus", "http://prometheus:9090",
                                                                             "proxy")
    saved = state.requests[-1]["body"]
    assert saved["overwrite"] is True and saved["folderUid"] == "msa-search"
    committed = json.loads((ROOT / "dashboards" / dashboards.DASHBOARD_FILE).read_text(encoding="utf-8"))
    assert saved["dashboard"] == committed and saved["dashboard"]["uid"] == dashboards.DASHBOARD_UID
    assert "folder created" in out and "data source created (Prometheus answers)" in out
    assert f"{url}/d/msa-robustness/" in out


def test_push_contract_is_idempotent(grafana, push):
    state, url = grafana
    assert push("--url", url)[0] == 0
    first = len(state.requests)
    code, out, err = push("--url", url)
    assert code == 0, err
    again = [(r["method"], r["path"]) for r in state.requests[first:]]
    assert again == [("GET", "/api/folders/msa-search"), ("GET", "/api/datasources/uid/msa-prometheus"),
                     ("PUT", "/api/datasources/uid/msa-prometheus"),
                     ("GET", "/api/datasources/uid/msa-prometheus/health"), ("POST", "/api/dashboards/db")]
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
    code, out, err = push("--url", url.replace("http://", "http://admin:admin@"))  # pragma: allowlist secret
    assert code == 1
    line = _one_error_line(err)
    assert "GRAFANA_TOKEN" in line and "admin:admin" not in line
    assert state.requests == []


def test_push_with_prometheus_down_changes_nothing_in_grafana(grafana, push):
    state, url = grafana
    state.prometheus_up = False
    code, out, err = push("--url", url, "--prometheus-url", "http://127.0.0.1:9090")
    assert code == 1
    line = _one_error_line(err)
    assert "--prometheus-url 'http://127.0.0.1:9090'" in line and "connection refused" in line
    assert "nothing was changed" in line
    assert state.folders == state.datasources == state.dashboards == {}, "the new folder and data source are removed"

    state.prometheus_up = True  # a working push, then one to a Prometheus that is down
    assert push("--url", url, "--prometheus-url", "http://127.0.0.1:9090")[0] == 0
    before = json.loads(json.dumps(state.datasources))
    state.prometheus_up = False
    code, out, err = push("--url", url, "--prometheus-url", "http://127.0.0.1:9091")
    assert code == 1 and "nothing was changed" in _one_error_line(err)
    assert state.datasources["msa-prometheus"]["url"] == before["msa-prometheus"]["url"] == "http://127.0.0.1:9090"
    assert state.dashboards[dashboards.DASHBOARD_UID]["version"] == 1, "the dashboard is not saved again"
