#!/usr/bin/env bash
# The real-browser test: starts kvql on a free port with a fresh SQLite file,
# then drives Debian's headless Chromium (playwright-core, no downloaded
# browser) through GraphiQL at /graphql and Swagger UI at /docs
# (.ci/browser/test.mjs). Fails if either page does not work or loads
# anything from another origin. Run from anywhere: bash .ci/browser.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
# Only what is missing: a Node.js from another source (NodeSource's bundles
# npm) conflicts with Debian's npm package.
missing=()
[ -x "$CHROMIUM" ] || missing+=(chromium chromium-driver)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian's ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
"$CHROMIUM" --version 2>/dev/null

(cd .ci/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

. .ci/kvql-server.sh
prepare_kvql browser
work="$KVQL_WORK"

password="browser-test-$RANDOM$RANDOM"
start_kvql "$work" KVQL_BOOTSTRAP_ADMIN_PASSWORD="$password"
base="$KVQL_BASE"

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
    tail -n 50 "$work/kvql.log" >&2
    exit 1
fi
