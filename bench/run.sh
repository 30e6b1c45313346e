#!/usr/bin/env bash
# kvql load benchmark: builds the release binary, installs wrk if missing, and
# runs bench/bench.py (scenarios, table, results file). Arguments are passed on:
#   bench/run.sh                 full run on SQLite (~10 minutes)
#   bench/run.sh --smoke         a few seconds per scenario (what CI runs)
#   bench/run.sh --postgres URL  on a fresh database of that PostgreSQL server
#   bench/run.sh --help          all options
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    echo "bench: installing wrk from Debian's packages" >&2
    if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }
    else
        sudo apt-get install -y -q wrk >/dev/null
    fi
fi
command -v wrk >/dev/null || { echo "bench: wrk is required (apt-get install wrk)" >&2; exit 1; }

# etcd is the baseline for durable writes; a full run installs it if it can.
case " $* " in
    *" --smoke "*) ;;
    *)
        if ! command -v etcd >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
            echo "bench: installing etcd-server from Debian's packages (durable-write baseline)" >&2
            apt-get install -y -q etcd-server >/dev/null 2>&1 || echo "bench: could not install etcd; no etcd baseline" >&2
        fi
        ;;
esac
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }

echo "bench: building the release binary" >&2
cargo build --release --quiet --bin kvql
exec python3 bench/bench.py --binary target/release/kvql "$@"
