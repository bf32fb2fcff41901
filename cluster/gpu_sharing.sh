#!/usr/bin/env bash
# Starts NVIDIA's MPS control daemon on a GPU worker, before `ray start` (worker_start_ray_commands
# in cluster.yaml and cluster.local.yaml). Trials that share a GPU (`search.gpus_per_trial` < 1)
# are separate processes: without MPS the GPU time-slices them, with MPS their small kernels run
# side by side. Measured on one H200 (README, "GPU check"): 8 LNLN trials sharing the GPU gave
# 331 trials/hour without MPS and 467-508 with it.
#
# Idempotent (a second `ray up` finds the daemon running); a node without a GPU, or without the
# MPS binary, starts Ray as before. MSA_SEARCH_MPS=0 in the node's environment leaves MPS off.
set -euo pipefail

say() { echo "gpu_sharing.sh: $*"; }

if [ "${MSA_SEARCH_MPS:-1}" = 0 ]; then
    say "MPS left off (MSA_SEARCH_MPS=0): trials sharing a GPU time-slice it"
    exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    say "no NVIDIA GPU on this node: MPS not needed"
    exit 0
fi
if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    say "nvidia-cuda-mps-control not found (it ships with the NVIDIA driver): trials sharing a GPU time-slice it" >&2
    exit 0
fi
if pgrep -u "$(id -u)" -x nvidia-cuda-mps-control >/dev/null 2>&1; then
    say "MPS control daemon already running"
    exit 0
fi
# The daemon serves the processes of the user who starts it: the same user starts Ray next.
nvidia-cuda-mps-control -d
say "MPS control daemon started (stop it with: echo quit | nvidia-cuda-mps-control)"
