#!/usr/bin/env bash
# Register a site's public key with the SuperLink, so that its SuperNode may connect.
#
#   deploy/tls/register-node.sh PUBLIC_KEY_FILE [CONNECTION] [SITE_NAME]
#
# CONNECTION is a SuperLink connection in $FLWR_HOME/config.toml (default: the default one),
# for example
#   [superlink.stamen]
#   address = "superlink.example.org:8000"
#   root-certificates = "/etc/stamen/tls/ca.crt"
# The SuperLink must run with --enable-supernode-auth (stamen superlink does by default):
# then a SuperNode whose key was not registered is refused. `flwr supernode list` shows the
# registered nodes, `flwr supernode unregister NODE_ID` removes one.
set -euo pipefail

PUB=${1:?usage: register-node.sh PUBLIC_KEY_FILE [CONNECTION] [SITE_NAME]}
CONNECTION=${2:-}
NAME=${3:-$(basename "$PUB" .key.pub)}
if [[ ! -r "$PUB" ]]; then
  echo "error: public key $PUB is not readable" >&2
  exit 2
fi
FLWR=${FLWR:-flwr}
args=(supernode register "$PUB")
[[ -n "$CONNECTION" ]] && args+=("$CONNECTION")
args+=(--name "$NAME" --format json)
"$FLWR" "${args[@]}"
