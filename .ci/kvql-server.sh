# Sourced by the CI scripts that talk to a live kvql (browser.sh, clients.sh,
# schemathesis.sh).
#
#   prepare_kvql NAME
#
# Builds the debug binary and makes KVQL_WORK, a temporary folder that is
# removed, with kvql stopped, when the script exits (an EXIT trap).
#
#   start_kvql WORK [VAR=value ...]
#
# Starts the debug build (`cargo build --bin kvql` first) with `serve` on
# 127.0.0.1:0, so the system picks a free port, with a fresh SQLite file in
# WORK unless KVQL_DATABASE_URL is among the arguments, and its log in
# WORK/kvql.log. Reads the bound address from the log, waits until /healthz
# answers, and sets KVQL_BASE (http://127.0.0.1:PORT) and KVQL_PID. Exits the
# script with the log on failure.

prepare_kvql() {
    cargo build --quiet --bin kvql
    KVQL_WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvql-$1.XXXXXX")"
    trap 'stop_kvql; rm -rf "$KVQL_WORK"' EXIT
}

start_kvql() {
    local work="$1"
    shift
    # Later assignments win: the caller's, then the two this needs.
    env "KVQL_DATABASE_URL=sqlite://$work/kvql.db?mode=rwc" "$@" \
        KVQL_LISTEN=127.0.0.1:0 "KVQL_LOG=warn,api::cli=info" \
        "${CARGO_TARGET_DIR:-target}/debug/kvql" serve >"$work/kvql.log" 2>&1 &
    KVQL_PID=$!
    local addr="" _
    for _ in $(seq 1 600); do
        addr="$(sed -n 's/.*kvql listening.*addr=\([0-9.]*:[0-9]*\).*/\1/p' "$work/kvql.log" | head -n1)"
        [ -n "$addr" ] && break
        kill -0 "$KVQL_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        echo "kvql did not start; its log:" >&2
        cat "$work/kvql.log" >&2
        exit 1
    fi
    KVQL_BASE="http://$addr"
    for _ in $(seq 1 300); do
        curl -fsS "$KVQL_BASE/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "kvql at $KVQL_BASE does not answer /healthz; its log:" >&2
    cat "$work/kvql.log" >&2
    exit 1
}

stop_kvql() {
    if [ -n "${KVQL_PID:-}" ]; then
        kill "$KVQL_PID" 2>/dev/null || true
        wait "$KVQL_PID" 2>/dev/null || true
    fi
}
