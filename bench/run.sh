#!/usr/bin/env bash
# kvql load benchmark: builds the release binary, installs wrk if missing, and
# runs bench/bench.py (scenarios, table, results file). Arguments are passed on:
#   bench/run.sh                 full run on SQLite (~10 minutes)
#   bench/run.sh --smoke         a few seconds per scenario (what CI runs)
#   bench/run.sh --postgres URL  on a fresh database of that PostgreSQL server
#   bench/run.sh --no-baselines  without redis+webdis, pgbench and etcd beside it
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

# The baselines: etcd for durable writes, Redis behind webdis for in-memory GET
# and SET (pgbench, for PostgreSQL, ships with PostgreSQL). A full run installs
# what is missing if it can, and runs without the baselines it could not get.
apt_updated=
install_baseline() {  # command, Debian package, what it is the baseline for
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "bench: installing $2 from Debian's packages ($3)" >&2
    apt-get install -y -q "$2" >/dev/null 2>&1 && return 0
    if [ -z "$apt_updated" ]; then
        apt_updated=1
        apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$2" >/dev/null 2>&1 && return 0
    fi
    echo "bench: could not install $2; no $3 in this run" >&2
}
case " $* " in
    *" --smoke "* | *" --no-baselines "*) ;;
    *)
        if [ "$(id -u)" -eq 0 ]; then
            export DEBIAN_FRONTEND=noninteractive
            install_baseline etcd etcd-server "etcd baseline (durable writes)"
            install_baseline redis-server redis-server "redis+webdis baseline (GET, SET)"
            install_baseline webdis webdis "redis+webdis baseline (GET, SET)"
        fi
        ;;
esac
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }

echo "bench: building the release binary" >&2
cargo build --release --quiet --bin kvql
exec python3 bench/bench.py --binary target/release/kvql "$@"
