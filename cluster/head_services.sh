#!/usr/bin/env bash
# Starts Prometheus and Grafana on the head, after `ray start --head` (the last of
# head_start_ray_commands in cluster.yaml and cluster.local.yaml). Both listen on 127.0.0.1 only
# and are reached through SSH tunnels (README, "Cluster"):
# - Prometheus scrapes every node's metrics port from Ray's service-discovery file
#   (cluster/prometheus.yml);
# - Grafana is provisioned with the committed dashboards/ (the robustness dashboard and its data
#   source) and with the dashboards Ray generated for this session, whose panels Ray's own
#   dashboard embeds (cluster/head.env).
# A second `ray up` runs it again: it restarts the two it started; their data stay in $state.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
. "$here/head.env"
state="$HOME/.msa-search/head"
# Shipped from your machine by `ray up` (file_mounts); there is no default password to fall back on.
password_file="$HOME/.msa-search/grafana_admin_password"
# Written by Ray's dashboard when it starts (provisioning for Ray's own Grafana dashboards).
ray_provisioning=/tmp/ray/session_latest/metrics/grafana/provisioning
# Where the committed dashboards/provisioning/dashboards/msa-search.yaml reads the dashboard
# (created by cluster/head_setup.sh).
dashboard_dir=/var/lib/grafana/dashboards/msa-search

fail() { echo "head_services.sh: $*" >&2; exit 1; }

wait_for() {  # wait_for SECONDS COMMAND...: polls COMMAND until it succeeds, or fails after SECONDS
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}

[ -s "$password_file" ] || fail "$password_file is missing: create it where you run \`ray up\` (README, \"Cluster\")"
mkdir -p "$state/prometheus" "$state/grafana/data" "$state/grafana/logs" "$state/grafana/plugins"
chmod 700 "$HOME/.msa-search" "$state"

# Stop what this script started last time (the pids it recorded), nothing else: a pid file that
# outlived a reboot (`ray down` stops cached nodes) may name another process by now.
for name in prometheus grafana; do
    if [ -s "$state/$name.pid" ]; then
        pid="$(cat "$state/$name.pid")"
        if [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$name" ]; then
            kill "$pid"
            wait_for 30 bash -c "! kill -0 $pid" || fail "$name (pid $pid) did not stop"
        fi
        rm -f "$state/$name.pid"
    fi
done

# Secrets for Grafana, as files only its process reads: the password without a trailing newline,
# and a random secret key (Grafana's built-in one, which encrypts its stored secrets, is public).
(umask 077
 printf '%s' "$(cat "$password_file")" > "$state/grafana_admin_password"
 [ -s "$state/grafana_secret_key" ] || head -c 32 /dev/urandom | base64 | tr -d '\n' > "$state/grafana_secret_key")

# Grafana's provisioning: the committed files as they are, plus Ray's for this session.
wait_for 60 test -s "$ray_provisioning/datasources/default.yml" \
    || fail "Ray wrote no $ray_provisioning within 60 s: is Ray's dashboard up (ray[default])?"
provisioning="$state/grafana/provisioning"
rm -rf "$provisioning"
mkdir -p "$provisioning/datasources" "$provisioning/dashboards"
cp "$repo/dashboards/provisioning/datasources/msa-search.yaml" "$provisioning/datasources/"
cp "$repo/dashboards/provisioning/dashboards/msa-search.yaml" "$provisioning/dashboards/"
cp "$ray_provisioning/datasources/default.yml" "$provisioning/datasources/ray.yml"
cp "$ray_provisioning/dashboards/default.yml" "$provisioning/dashboards/ray.yml"
cp "$repo/dashboards/robustness.json" "$dashboard_dir/"

# nohup: they outlive the SSH session `ray up` runs this in, as Ray's own daemons do.
nohup prometheus --config.file="$here/prometheus.yml" --web.listen-address="$MSA_PROMETHEUS_ADDR" \
    --storage.tsdb.path="$state/prometheus" --storage.tsdb.retention.time=30d \
    > "$state/prometheus.log" 2>&1 < /dev/null &
echo $! > "$state/prometheus.pid"

grafana_bin="$(command -v grafana || echo /usr/share/grafana/bin/grafana)"
GF_PATHS_DATA="$state/grafana/data" GF_PATHS_LOGS="$state/grafana/logs" \
GF_PATHS_PLUGINS="$state/grafana/plugins" GF_PATHS_PROVISIONING="$provisioning" \
GF_SERVER_HTTP_PORT="$MSA_GRAFANA_PORT" \
GF_SECURITY_ADMIN_PASSWORD__FILE="$state/grafana_admin_password" \
GF_SECURITY_SECRET_KEY__FILE="$state/grafana_secret_key" \
    nohup "$grafana_bin" server --homepath /usr/share/grafana --config "$here/grafana.ini" \
    > "$state/grafana.log" 2>&1 < /dev/null &
echo $! > "$state/grafana.pid"

wait_for 60 curl -fsS "http://$MSA_PROMETHEUS_ADDR/-/ready" \
    || fail "Prometheus is not ready after 60 s; its log: $state/prometheus.log"
wait_for 60 curl -fsS "http://127.0.0.1:$MSA_GRAFANA_PORT/api/health" \
    || fail "Grafana is not ready after 60 s; its log: $state/grafana.log"
echo "head_services.sh: Prometheus on $MSA_PROMETHEUS_ADDR, Grafana on 127.0.0.1:$MSA_GRAFANA_PORT (tunnel: ray attach -p $MSA_GRAFANA_PORT)"
