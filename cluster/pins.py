"""Prints the requirement pyproject.toml pins for each package named: `python3 cluster/pins.py torch`
prints `torch==2.13.0`. The cluster's install script reads its versions here, so pyproject.toml
stays their one home (Ray's version on every node included). Standard library only: it runs
before the node has a virtualenv (Python >= 3.11 for tomllib)."""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pinned(package: str, pyproject: Path = PYPROJECT) -> str:
    """The `name==version` pin of `package` in [project].dependencies, extras dropped."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", dep.strip())
        if match and match.group(1).lower() == package.lower():
            return f"{match.group(1)}=={match.group(3)}"
    raise SystemExit(f"pins.py: {pyproject} pins no {package} (expected a `{package}==VERSION` dependency)")


if __name__ == "__main__":
    print(" ".join(pinned(name) for name in sys.argv[1:]))
