#!/usr/bin/env bash
# Installs Prometheus and Grafana on the head node (head_setup_commands of cluster.yaml and
# cluster.local.yaml). Debian's packages would start daemons with open defaults (Prometheus on
# every interface, Grafana on every interface with admin/admin), so their services are kept from
# starting and stay disabled; cluster/head_services.sh runs both as the SSH user, on 127.0.0.1.
set -euo pipefail

# The Grafana 11 build that search/dashboards.py's SDK (grafana-foundation-sdk 11.6.0) targets.
GRAFANA_VERSION=11.6.0
# Where the committed dashboards/provisioning/dashboards/msa-search.yaml looks for the JSON.
DASHBOARD_DIR=/var/lib/grafana/dashboards/msa-search

if ! command -v prometheus >/dev/null || [ "$(dpkg-query -W -f='${Version}' grafana 2>/dev/null)" != "$GRAFANA_VERSION" ]; then
    sudo install -d -m 0755 /etc/apt/keyrings
    curl -fsSL https://apt.grafana.com/gpg.key | sudo gpg --dearmor --yes -o /etc/apt/keyrings/grafana.gpg
    echo "deb [signed-by=/etc/apt/keyrings/grafana.gpg] https://apt.grafana.com stable main" \
        | sudo tee /etc/apt/sources.list.d/grafana.list >/dev/null
    # policy-rc.d exit 101: package scripts may not start services, not even for a moment.
    echo 'exit 101' | sudo tee /usr/sbin/policy-rc.d >/dev/null
    sudo chmod +x /usr/sbin/policy-rc.d
    trap 'sudo rm -f /usr/sbin/policy-rc.d' EXIT
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus "grafana=$GRAFANA_VERSION"
fi
sudo systemctl disable --now prometheus grafana-server >/dev/null 2>&1 || true

sudo install -d -o "$(id -un)" -m 0755 "$DASHBOARD_DIR"
# Grafana runs as the SSH user: it must pass through the package's own directory to reach it.
sudo chmod o+x /var/lib/grafana /var/lib/grafana/dashboards
echo "head_setup.sh: $(prometheus --version 2>&1 | head -n1); grafana $GRAFANA_VERSION"
