#!/usr/bin/env bash
# kvql against the GraphQL clients people use (the programs in clients/):
#   audit       graphql-http's serverAudits (GraphQL over HTTP; no warn, no error)
#   apollo      Apollo Client 4: login, read/write, cache ids, APQ, batching, error codes
#   graphql-ws  graphql-ws 6: subscriptions, reconnection, 4403, anonymous login
#   legacy-ws   subscriptions-transport-ws 0.11 (the legacy protocol)
#   gql         Python gql 4: AIOHTTPTransport and WebsocketsTransport
#   curl        the README's curl examples: GET, batch, 405, 415, APQ by hand
#   browser     Apollo Client in headless Chromium on another origin (CORS)
#   snippets    the README quotes the programs' snippets verbatim
# Installs what it needs (npm ci in clients/, a Python venv, Debian's chromium
# when missing), builds and starts kvql (debug build, fresh SQLite file, free
# port), runs every program, stops kvql, and exits non-zero if any failed.
#
#   bash .ci/clients.sh                  all programs
#   bash .ci/clients.sh apollo browser   some of them
#   KVQL_CLIENTS_VENV=/path              where the Python venv lives (kept between runs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

VENV="${KVQL_CLIENTS_VENV:-${TMPDIR:-/tmp}/kvql-clients-venv}"
ADMIN_PASSWORD="clients-admin-password"
ALL_PROGRAMS=(audit apollo graphql-ws legacy-ws gql curl browser snippets)
if [ "$#" -eq 0 ]; then PROGRAMS=("${ALL_PROGRAMS[@]}"); else PROGRAMS=("$@"); fi

say() { printf 'clients.sh: %s\n' "$*" >&2; }
START=$SECONDS

# --- what the programs need ---
command -v node >/dev/null && command -v npm >/dev/null || { say "node (20 or newer) and npm are required"; exit 1; }
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || { say "node 20 or newer is required, found $(node --version)"; exit 1; }
if ! command -v curl >/dev/null; then
    say "installing curl (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
fi
say "npm ci in clients/ (node $(node --version))"
(cd clients && npm ci --no-audit --no-fund --loglevel=error)

want() { local p; for p in "${PROGRAMS[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

if want gql; then
    if ! "$VENV/bin/python" -c 'import gql' >/dev/null 2>&1 \
        || ! cmp -s clients/requirements.txt "$VENV/.requirements.txt"; then
        say "installing clients/requirements.txt into $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -r clients/requirements.txt
        cp clients/requirements.txt "$VENV/.requirements.txt"
    fi
fi

CHROMIUM="${KVQL_CHROMIUM:-/usr/bin/chromium}"
if want browser && [ ! -x "$CHROMIUM" ]; then
    say "installing Debian's chromium (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# --- the server ---
. .ci/kvql-server.sh
say "building kvql (debug)"
prepare_kvql clients
WORK="$KVQL_WORK"

say "starting kvql (log: $WORK/kvql.log)"
start_kvql "$WORK" \
    KVQL_BOOTSTRAP_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
    KVQL_GRAPHQL_MAX_BATCH=5
BASE="$KVQL_BASE"
SERVER_PID="$KVQL_PID"
say "kvql is up ($((SECONDS - START)) s since the start, installs and build included)"

# --- the programs ---
export KVQL_URL="$BASE" KVQL_ADMIN_PASSWORD="$ADMIN_PASSWORD" KVQL_CHROMIUM="$CHROMIUM"
passed=0
failed=0
failed_names=()
for program in "${PROGRAMS[@]}"; do
    case "$program" in
        audit | apollo | graphql-ws | legacy-ws | browser | snippets) cmd=(node "clients/$program.mjs") ;;
        gql) cmd=("$VENV/bin/python" clients/gql_client.py) ;;
        curl) cmd=(bash clients/curl.sh) ;;
        *) say "unknown program $program (known: ${ALL_PROGRAMS[*]})"; exit 2 ;;
    esac
    printf '\n==> clients: %s\n' "$program"
    t0=$SECONDS
    if (cd "$ROOT" && "${cmd[@]}"); then
        passed=$((passed + 1))
        say "$program passed ($((SECONDS - t0)) s)"
    else
        failed=$((failed + 1))
        failed_names+=("$program")
        say "$program FAILED ($((SECONDS - t0)) s)"
    fi
done

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    say "kvql died during the run; its log:"
    cat "$WORK/kvql.log" >&2
    failed=$((failed + 1))
    failed_names+=("server")
fi

printf '\n'
[ "$failed" -eq 0 ] || say "failed: ${failed_names[*]} (kvql's log follows)"
[ "$failed" -eq 0 ] || tail -n 50 "$WORK/kvql.log" >&2
say "took $((SECONDS - START)) s"
echo "clients: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
