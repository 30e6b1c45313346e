#!/usr/bin/env bash
# The OpenAPI document is the truth: runs schemathesis, every check, against a
# live kvql (debug build, fresh SQLite database, logged-in owner token) and
# fails on any finding. Bounded: SCHEMATHESIS_MAX_EXAMPLES cases per operation
# and phase, SCHEMATHESIS_MAX_TIME seconds in all.
#
#   bash .ci/schemathesis.sh                 what CI runs
#   SCHEMATHESIS_MAX_EXAMPLES=500 SCHEMATHESIS_MAX_TIME=900 bash .ci/schemathesis.sh
#   SCHEMATHESIS_SEED=1234 bash .ci/schemathesis.sh     reproduce a run
#   KVQL_SCHEMATHESIS_DATABASE_URL=postgres://.../fresh_db bash .ci/schemathesis.sh
#                                            on an empty PostgreSQL database
#
# Needs python3 (with venv) and PyPI; the venv is kept between runs
# (KVQL_SCHEMATHESIS_VENV, KVQL_SCHEMATHESIS_PYTHON choose it).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
VENV="${KVQL_SCHEMATHESIS_VENV:-${TMPDIR:-/tmp}/kvql-schemathesis-venv}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-50}"
MAX_TIME="${SCHEMATHESIS_MAX_TIME:-180}"
ADMIN_PASSWORD="schemathesis-admin-password"

say() { printf 'schemathesis.sh: %s\n' "$*" >&2; }

# The newest Python at hand: CPython 3.11 before 3.11.8 can crash in
# schemathesis's coverage phase ("AST constructor recursion depth mismatch").
PYTHON="${KVQL_SCHEMATHESIS_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    # pyenv's shims answer only for the selected version, so look in its
    # versions folder as well.
    PYENV_PYTHONS="$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V -r || true)"
    for candidate in python3.13 python3.12 $PYENV_PYTHONS python3; do
        if "$candidate" -c 'import venv' >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
fi
[ -n "$PYTHON" ] || { say "python3 with venv is required"; exit 1; }

# One venv per Python version, so a newer Python replaces an older venv.
VENV="$VENV-$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION into $VENV (with $PYTHON)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

. .ci/kvql-server.sh
say "building kvql"
prepare_kvql schemathesis
WORK="$KVQL_WORK"

say "starting kvql (log: $WORK/kvql.log)"
start_kvql "$WORK" \
    KVQL_DATABASE_URL="${KVQL_SCHEMATHESIS_DATABASE_URL:-sqlite://$WORK/kvql.db?mode=rwc}" \
    KVQL_BOOTSTRAP_ADMIN_PASSWORD="$ADMIN_PASSWORD"
BASE="$KVQL_BASE"
SERVER_PID="$KVQL_PID"
say "kvql is up at $BASE"

# Waits for the server (giving up if it exits) and logs in as the admin.
TOKEN="$(python3 - "$BASE" "$ADMIN_PASSWORD" "$SERVER_PID" <<'PY'
import json, os, sys, time, urllib.request

base, password, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen(base + "/healthz", timeout=2).read()
        break
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("kvql exited before answering")
        if time.monotonic() > deadline:
            sys.exit("kvql does not answer")
        time.sleep(0.1)
login = urllib.request.Request(
    base + "/login",
    data=json.dumps({"username": "admin", "password": password}).encode(),
    headers={"Content-Type": "application/json"},
)
print(json.load(urllib.request.urlopen(login, timeout=30))["access_token"])
PY
)" || { cat "$WORK/kvql.log" >&2; say "could not start kvql and log in"; exit 1; }

SEED_ARGS=()
[ -n "${SCHEMATHESIS_SEED:-}" ] && SEED_ARGS=(--seed "$SCHEMATHESIS_SEED")

say "running schemathesis $SCHEMATHESIS_VERSION, all checks, up to $MAX_EXAMPLES examples per operation, at most ${MAX_TIME}s"
status=0
# From the temp directory, where schemathesis keeps its cache (.schemathesis/).
ROOT="$PWD"
cd "$WORK"
# The hooks adapt generated bodies to the one rule OpenAPI cannot state (see the file).
PYTHONPATH="$ROOT/.ci${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=schemathesis_hooks \
"$VENV/bin/schemathesis" --config-file "$ROOT/.ci/schemathesis.toml" run "$BASE/openapi.json" \
    --checks all \
    --header "Authorization: Bearer $TOKEN" \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" \
    --workers 2 \
    --request-timeout 10 \
    --generation-database none \
    --no-color \
    "${SEED_ARGS[@]}" || status=$?

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    say "kvql died during the run:"
    cat "$WORK/kvql.log" >&2
    exit 1
fi
if grep -q 'ERROR\|panicked' "$WORK/kvql.log"; then
    say "kvql logged errors during the run:"
    grep 'ERROR\|panicked' "$WORK/kvql.log" >&2
    status=1
fi
[ "$status" -eq 0 ] && say "no findings" || say "schemathesis found problems (exit $status)"
exit "$status"
