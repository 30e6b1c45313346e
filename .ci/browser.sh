#!/usr/bin/env bash
# The real-browser test: starts kvql on a free port with a fresh SQLite file,
# then drives Debian's headless Chromium (playwright-core, no downloaded
# browser) through GraphiQL at /graphql and Swagger UI at /docs
# (.ci/browser/test.mjs). Fails if either page does not work or loads
# anything from another origin. Run from anywhere: bash .ci/browser.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ] || ! command -v npm >/dev/null; then
    echo "installing Debian's chromium, nodejs and npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver nodejs npm >/dev/null
fi
"$CHROMIUM" --version 2>/dev/null

(cd .ci/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

cargo build --bin kvql
bin="${CARGO_TARGET_DIR:-target}/debug/kvql"

work="$(mktemp -d)"
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
password="browser-test-$RANDOM$RANDOM"
KVQL_DATABASE_URL="sqlite://$work/kvql.db?mode=rwc" \
KVQL_LISTEN="127.0.0.1:$port" \
KVQL_BOOTSTRAP_ADMIN_PASSWORD="$password" \
    "$bin" serve >"$work/server.log" 2>&1 &
server=$!

for _ in $(seq 1 300); do
    curl -fsS "$base/healthz" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log"; echo "kvql exited" >&2; exit 1; }
    sleep 0.1
done
curl -fsS "$base/healthz" >/dev/null || { cat "$work/server.log"; echo "kvql did not answer" >&2; exit 1; }

token="$(curl -fsS -X POST "$base/login" -H 'Content-Type: application/json' \
    -d "{\"username\": \"admin\", \"password\": \"$password\"}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')"
key="browser/swagger"
curl -fsS -o /dev/null -X POST "$base/api/object" \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d "{\"key\": \"$key\", \"data\": {\"seen\": \"in Swagger UI\"}}"

if ! KVQL_URL="$base" KVQL_TOKEN="$token" KVQL_KEY="$key" CHROMIUM="$CHROMIUM" \
    node .ci/browser/test.mjs; then
    echo "--- kvql's log" >&2
    tail -n 50 "$work/server.log" >&2
    exit 1
fi
