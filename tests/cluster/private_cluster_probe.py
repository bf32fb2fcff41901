"""Run by tests/cluster/test_private_cluster.py in a fresh process (its own HOME, so its own
token): starts the private local cluster as `train` and `tune` do, asks the Jobs API without and
with the token, lists the sockets the cluster's processes listen on, and prints it all as JSON."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import psutil
import ray

from search.ray_setup import ensure_ray


def jobs_api_status(dashboard: str, headers: dict) -> int:
    request = urllib.request.Request(f"http://{dashboard}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> None:
    ensure_ray(None)
    # Where this cluster's dashboard listens: 8265 unless another cluster on the machine holds it
    # (Ray then takes the next free port), and asking 8265 would then ask that other cluster.
    dashboard = ray._private.worker._global_node.webui_url
    token = (os.path.expanduser("~/.ray/auth_token"))
    deadline = time.monotonic() + 60
    while True:  # the dashboard answers a few seconds after ray.init returns
        try:
            without = jobs_api_status(dashboard, {})
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    with open(token) as f:
        with_token = jobs_api_status(dashboard, {"Authorization": f"Bearer {f.read().strip()}"})
    me = psutil.Process()
    procs = {p.pid: p for p in me.children(recursive=True)} | {me.pid: me}
    listening = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            proc = procs[conn.pid]
            listening.append({"name": "driver" if proc.pid == me.pid else proc.name(),
                              "cmdline": " ".join(proc.cmdline()), "ip": conn.laddr.ip, "port": conn.laddr.port})
    print(json.dumps({"auth_mode": os.environ.get("RAY_AUTH_MODE"), "token_mode": os.stat(token).st_mode & 0o777,
                      "without_token": without, "with_token": with_token,
                      "dashboard_port": int(dashboard.rpartition(":")[2]), "listening": listening}))
    ray.shutdown()


if __name__ == "__main__":
    main()
