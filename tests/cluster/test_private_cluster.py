"""The private local cluster that `train` and `tune` start (search/ray_setup.py): token auth
on, so the Jobs API refuses a request without the token (CVE-2023-48022); the dashboard on
loopback; and whatever else listens beyond loopback is in the README's list."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from search.ray_setup import owner_only_token

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# Beyond loopback in Ray 2.60, which gives no setting to bind them elsewhere (README, "Cluster",
# "A private local cluster"): process -> why.
DOCUMENTED = {
    "gcs_server": "the GCS (gRPC, token-checked)",
    "raylet": "the raylet and object manager (gRPC, token-checked)",
    "driver": "this process's core worker (gRPC, token-checked)",
    "ray::": "Ray's worker processes and agents: core workers (gRPC, token-checked), the dashboard "
             "agent (gRPC, and its metrics port), the runtime-env agent",
    "monitor.py": "the autoscaler monitor's metrics port (read-only)",
    "dashboard.py": "the dashboard's metrics port (read-only); the dashboard itself is on loopback",
}

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_AUTH_MODE", None)  # as on a machine where nobody set it
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("private_cluster_probe.py"))], env=env,
                         capture_output=True, text=True, timeout=240, cwd=home)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_jobs_api_refuses_a_request_without_the_token(probe):
    assert probe["auth_mode"] == "token"
    assert probe["token_mode"] == 0o600, f"token file mode {probe['token_mode']:o}: other users could read it"
    assert probe["without_token"] == 401
    assert probe["with_token"] == 200


def test_the_dashboard_is_on_loopback_and_every_other_listener_is_documented(probe):
    dashboard = [s for s in probe["listening"] if s["port"] == probe["dashboard_port"]]
    assert dashboard and all(s["ip"] in LOOPBACK for s in dashboard), dashboard
    readme = (ROOT / "README.md").read_text()
    for socket in probe["listening"]:
        if socket["ip"] in LOOPBACK:
            continue
        who = next((key for key in DOCUMENTED if key in socket["name"] or key in socket["cmdline"]), None)
        assert who is not None, f"undocumented listener on {socket['ip']}:{socket['port']}: {socket['cmdline'][:200]}"
        assert f"`{who}`" in readme, f"README's list lacks `{who}` ({DOCUMENTED[who]})"


def test_the_token_file_is_made_owner_only(tmp_path, monkeypatch):
    """Ray writes a new token with the umask (0644 under the usual 022): every user of the machine
    could read it and run commands through the Jobs API on loopback."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    previous = os.umask(0o022)
    try:
        token = tmp_path / ".ray" / "auth_token"
        assert owner_only_token(tmp_path) is None  # none yet: written owner-only
        value = token.read_text()
        assert token.stat().st_mode & 0o777 == 0o600 and re.fullmatch(r"[0-9a-f]{64}", value)
        token.chmod(0o644)  # as Ray writes one
        note = owner_only_token(tmp_path)
        assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == value
        assert note.startswith(f"note: {token} was readable by other users (mode 644)"), note
        assert owner_only_token(tmp_path) is None  # nothing more to say
        token.chmod(0o644)
        for name, setting in (("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN_PATH", str(token))):
            monkeypatch.setenv(name, setting)  # the user's own choice: left alone
            assert owner_only_token(tmp_path) is None and token.stat().st_mode & 0o777 == 0o644
            monkeypatch.delenv(name)
    finally:
        os.umask(previous)
