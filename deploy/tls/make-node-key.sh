#!/usr/bin/env bash
# A SuperNode's authentication key pair (one per site).
#
#   deploy/tls/make-node-key.sh SITE_ID [OUT_DIR]
#
# Writes OUT_DIR/SITE_ID.key (private, mode 600: stays on the site, given to the SuperNode
# with --auth-supernode-private-key, i.e. `auth-key` in stamen's node config) and
# OUT_DIR/SITE_ID.key.pub (public: the federation operator registers it on the SuperLink
# with deploy/tls/register-node.sh). Flower wants an OpenSSH-format key on a NIST curve;
# this makes ECDSA P-384. An existing key is never overwritten.
set -euo pipefail

SITE_ID=${1:?usage: make-node-key.sh SITE_ID [OUT_DIR]}
OUT_DIR=${2:-"$(dirname "$0")/keys"}
if [[ ! "$SITE_ID" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; then
  echo "error: site-id '$SITE_ID' must be 1-64 letters, digits, '.', '_' or '-'" >&2
  exit 2
fi
KEY="$OUT_DIR/$SITE_ID.key"
if [[ -e "$KEY" ]]; then
  echo "error: $KEY exists; a site keeps its key (remove it only to re-register the site)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
ssh-keygen -q -t ecdsa -b 384 -N "" -C "stamen-site:$SITE_ID" -f "$KEY"
chmod 600 "$KEY"
chmod 644 "$KEY.pub"
echo "wrote $KEY (private, keep on the site) and $KEY.pub (register it on the SuperLink)"
