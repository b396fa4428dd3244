#!/usr/bin/env bash
# Development certificates for a stamen federation: a CA and a SuperLink server certificate.
#
#   deploy/tls/make-dev-ca.sh [OUT_DIR] [EXTRA_SAN ...]
#
# Writes OUT_DIR (default: deploy/tls/certs) with
#   ca.crt / ca.key          the development CA (ca.crt goes to every SuperNode and `flwr` user)
#   server.crt / server.key  the SuperLink's certificate, signed by the CA
# The server certificate names 127.0.0.1, ::1 and localhost; EXTRA_SAN adds more, e.g.
# `DNS:superlink` (the compose service) or `DNS:fl.example.org` / `IP:10.0.0.5`.
#
# DEVELOPMENT ONLY: the CA key sits next to the certificates it signed. In production,
# bring certificates from your own PKI (any CA the SuperNodes trust) and keep CA keys off
# the SuperLink host. Existing files are never overwritten: delete OUT_DIR to start over.
set -euo pipefail

OUT_DIR=${1:-"$(dirname "$0")/certs"}
shift || true
DAYS=${STAMEN_CERT_DAYS:-365}

SAN="IP:127.0.0.1,IP:::1,DNS:localhost"
for extra in "$@"; do
  case "$extra" in
    DNS:*|IP:*) SAN="$SAN,$extra" ;;
    *) echo "error: extra SAN '$extra' must start with DNS: or IP:" >&2; exit 2 ;;
  esac
done

if [[ -e "$OUT_DIR/ca.key" || -e "$OUT_DIR/server.key" ]]; then
  echo "error: $OUT_DIR already holds keys; remove it to make new ones" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
umask 077

# The CA: P-384 (a NIST curve, as for the SuperNode keys), self-signed, may sign only leaves.
openssl ecparam -name secp384r1 -genkey -noout -out "$OUT_DIR/ca.key"
openssl req -x509 -new -key "$OUT_DIR/ca.key" -sha384 -days "$DAYS" \
  -subj "/O=stamen development/CN=stamen development CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$OUT_DIR/ca.crt"

# The SuperLink's key and certificate (serverAuth, with the names clients dial).
openssl ecparam -name secp384r1 -genkey -noout -out "$OUT_DIR/server.key"
openssl req -new -key "$OUT_DIR/server.key" -subj "/O=stamen development/CN=superlink" \
  -out "$OUT_DIR/server.csr"
cat > "$OUT_DIR/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EXT
openssl x509 -req -in "$OUT_DIR/server.csr" -CA "$OUT_DIR/ca.crt" -CAkey "$OUT_DIR/ca.key" \
  -CAcreateserial -days "$DAYS" -sha384 -extfile "$OUT_DIR/server.ext" -out "$OUT_DIR/server.crt"
rm -f "$OUT_DIR/server.csr" "$OUT_DIR/server.ext" "$OUT_DIR/ca.srl"

chmod 600 "$OUT_DIR/ca.key" "$OUT_DIR/server.key"
chmod 644 "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt"
openssl verify -CAfile "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt" >/dev/null
echo "wrote $OUT_DIR/{ca.crt,ca.key,server.crt,server.key} (server names: $SAN)"
