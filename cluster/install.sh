#!/usr/bin/env bash
# Installs msa-search on one cluster node (setup_commands of cluster.yaml and cluster.local.yaml;
# `ray up` runs it on the head and on every worker it starts). The same three steps as the
# README's "GPU cluster" install, in the same order, with the versions pyproject.toml pins
# (cluster/pins.py), so Ray on the nodes is the version the project pins:
#   1. the CUDA build of the pinned torch (an unpinned one would not match the project's pin);
#   2. deepspeed without build isolation, so its build sees that torch;
#   3. the project, which brings ray[default,tune,train] at its pinned version.
# Idempotent: pip skips what is already installed, so a second `ray up` costs seconds.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Pick the CUDA build your nodes' driver supports (README, "GPU cluster").
torch_index="${MSA_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"

# The secrets `ray up` shipped with file_mounts (README, "Cluster"); without the token every
# `ray start` of this cluster would fail, so say so here, before minutes of installing.
if [ ! -s "$HOME/.ray/auth_token" ]; then
    echo "install.sh: ~/.ray/auth_token is missing on this node: run \`ray get-auth-token --generate\` where you run \`ray up\`" >&2
    exit 1
fi
chmod 600 "$HOME/.ray/auth_token"

cd "$repo"
if [ ! -x .venv/bin/python ] && ! python3 -m venv .venv 2>/dev/null; then
    # Ubuntu's and Debian's Python make venvs only with python3-venv installed.
    rm -rf .venv
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv .venv
fi
. .venv/bin/activate
pins="$(python3 cluster/pins.py torch deepspeed ray)"
read -r torch_pin deepspeed_pin ray_pin <<< "$pins"

# setuptools: venvs of Python >= 3.12 come without it, and deepspeed builds from source with it.
pip install --quiet --upgrade pip setuptools
pip install --quiet "$torch_pin" --index-url "$torch_index"
pip install --quiet --no-build-isolation "$deepspeed_pin"
pip install --quiet -e .

installed_ray="ray==$(python -c 'import ray; print(ray.__version__)')"
if [ "$installed_ray" != "$ray_pin" ]; then
    echo "install.sh: this node has $installed_ray, pyproject.toml pins $ray_pin" >&2
    exit 1
fi

# Interactive shells (`ray attach`, `ray exec`, and the shell `ray up` starts Ray from) get the
# project's venv and token auth; Ray's own commands source ~/.bashrc first.
marker="# msa-search cluster (cluster/install.sh)"
if ! grep -qF "$marker" "$HOME/.bashrc" 2>/dev/null; then
    printf '\n%s\n. %s/.venv/bin/activate\nexport RAY_AUTH_MODE=token\n' "$marker" "$repo" >> "$HOME/.bashrc"
fi
echo "install.sh: $torch_pin $deepspeed_pin $installed_ray msa-search installed in $repo/.venv"
