"""No credential or default password in any file git tracks (or would track: untracked files git
does not ignore count too, so a secret is caught before its first commit). A finding names the
file, the line and the kind of secret, never the secret itself, since CI logs are read widely."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A value that only points at a secret: a variable, a template, a file, or a placeholder in capitals.
_REFERENCE = r"""(?!["']?(?:\$|\{\{|<|~/|/|(?-i:[A-Z][A-Z0-9_]*)["']?(?:\s|$|@)))"""
# A line that holds a deliberate example (a test of refusing one) says so, with this marker.
ALLOWED = "pragma: allowlist secret"

RULES: dict[str, re.Pattern] = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*" + _REFERENCE + r"\S{20,}"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    "Grafana admin password in a config": re.compile(r"(?i)^\s*admin_password\s*=\s*(?!\$__(?:file|env)\{)\S"),
    "Grafana secret in the environment": re.compile(
        r"\bGF_\w*?(?:PASSWORD|SECRET_KEY|TOKEN|API_KEY)\s*[:=]\s*" + _REFERENCE + r"""["']?[^\s"'$]"""),
    "password with a literal value": re.compile(
        r"(?i)\b\w*password\w*\s*[:=]\s*" + _REFERENCE + r"""["']?[^\s"'$#,)]{3,}"""),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:" + _REFERENCE + r"[^\s/@'\"]+@"),
    "Grafana service-account token": re.compile(r"\bglsa_[A-Za-z0-9]{32}_[0-9a-f]{8}\b"),
    "Grafana API key": re.compile(r"\beyJrIjoi[A-Za-z0-9+/=]{20,}"),
    "GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{40,})"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "bearer token": re.compile(r"(?i)\bBearer\s+" + _REFERENCE + r"[A-Za-z0-9._~+/-]{20,}"),
    # Ray's tokens are 64 hex digits (secrets.token_hex(32)); any long key-like value named a token.
    "token or secret with a literal value": re.compile(
        r"(?i)\b\w*(?:token|secret|api_?key)\w*\s*[:=]\s*" + _REFERENCE
        + r"""["']?(?=[A-Za-z_+/=-]*\d)(?=[0-9_+/=-]*[A-Za-z])[A-Za-z0-9+/=_-]{32,}"""),
}
# In Python a bare name after `password=` is a variable (`login(password=args.password)`): only a
# quoted value is a literal there.
PYTHON_RULES = {**RULES, "password with a literal value": re.compile(
    r"""(?i)\b\w*password\w*\s*[:=]\s*(?:\w+\s*=\s*)?["']""" + _REFERENCE + r"""[^"'$\s]{3,}["']""")}
# Files that are secrets by their name alone (a Ray token, SSH keys, the Grafana password file).
SECRET_FILE_NAMES = re.compile(r"(?:^|/)(?:auth_token|id_rsa|id_ecdsa|id_ed25519|grafana_admin_password|[^/]*\.pem)$")


def findings_in(path: Path, shown: str) -> list[str]:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return []  # binary
    rules = PYTHON_RULES if path.suffix == ".py" else RULES
    found = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if ALLOWED in line:
            continue
        found += [f"{shown}:{number}: {kind}" for kind, rule in rules.items() if rule.search(line)]
    return found


def repository_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing tells which files belong to the repository")
    return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def test_no_credential_or_default_password_in_the_repository():
    names = repository_files()
    assert "cluster.yaml" in names and "README.md" in names
    found = [f"{name}: a secret by its file name" for name in names if SECRET_FILE_NAMES.search(name)]
    for name in names:
        found += findings_in(ROOT / name, name)
    assert not found, "credentials or default passwords in the repository:\n" + "\n".join(found)


# Planted secrets, built at run time so that this file holds none of them.
PLANTED = {
    "AWS access key id": "aws_access_key_id = AKIA" + "Q" * 16,
    "private key": "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
    "Grafana admin password in a config": "admin_password" + " = admin",
    "Grafana secret in the environment": "GF_SECURITY_ADMIN_PASS" + "WORD=admin",
    "password with a literal value": "  pass" + "word: hunter22",
    "credentials in a URL": "url: http://admin:" + "admin@grafana:3000",
    "Grafana service-account token": "GRAFANA_TOKEN=glsa_" + "a1" * 16 + "_0123abcd",
    "token or secret with a literal value": "RAY_AUTH_" + "TOKEN=" + "3f9a" * 16,
}
HARMLESS = [
    "GF_SECURITY_ADMIN_PASSWORD__FILE=$state/grafana_admin_password",
    'password_file="$HOME/.msa-search/grafana_admin_password"',
    "admin_password = $__file{/run/secrets/grafana}",
    "GRAFANA_TOKEN=glsa_... msa-search dashboards push --url http://grafana:3000",
    "  ~/.ray/auth_token: ~/.ray/auth_token",
    "postgresql://USER:PASSWORD@db.internal/optuna",
    "nothing falls back to a default user or password.",
    "ssh_user: REPLACE-with-your-ssh-user",
    "token_ids = batch.text_bert[:, 0]",
]


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_scan_finds_a_planted_secret_and_names_file_and_line(tmp_path, kind):
    planted = tmp_path / "leak.cfg"
    planted.write_text("# fine\n" + PLANTED[kind] + "\n")
    assert f"leak.cfg:2: {kind}" in findings_in(planted, "leak.cfg")


def test_scan_leaves_references_and_placeholders_alone(tmp_path):
    harmless = tmp_path / "fine.sh"
    harmless.write_text("\n".join(HARMLESS) + "\n" + PLANTED["credentials in a URL"] + "  # " + ALLOWED + "\n")
    assert findings_in(harmless, "fine.sh") == []


def test_python_variables_are_not_literals_but_quoted_values_are(tmp_path):
    code = tmp_path / "client.py"
    code.write_text("login(user, password=args.password)\n" + "pass" + "word: str = 'hunter22'\n")
    assert findings_in(code, "client.py") == ["client.py:2: password with a literal value"]


def test_secret_file_names_are_recognised():
    assert all(SECRET_FILE_NAMES.search(n) for n in ("auth_token", "keys/id_ed25519", "ray_bootstrap_key.pem"))
    assert not SECRET_FILE_NAMES.search("cluster/install.sh")
