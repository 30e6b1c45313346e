#!/usr/bin/env python3
"""CPU per request of one scenario, for comparing two builds.

Starts BINARY on a fresh database (SQLite in a temporary directory, or with
--postgres a scratch database of that server, dropped after), pre-loads
--keys keys, then runs one scenario of bench.py with `wrk -t1` --runs times
and prints, per run: req/s, p50, p99, the kvql process's CPU per request,
PostgreSQL's (all processes named postgres on this machine) and the share of
the machine's CPU left idle; at the end the server's RSS and its anonymous
part. Compare builds in alternating runs on the same machine:

    python3 bench/cpu.py /tmp/kvql-before --scenario rest_put
    python3 bench/cpu.py /tmp/kvql-after --scenario rest_put
    python3 bench/cpu.py /tmp/kvql-before --postgres postgres://postgres@127.0.0.1:5432/postgres
    python3 bench/cpu.py target/release/kvql --scenario rest_get --keys 1000000 --env KVQL_CACHE_BYTES=0

Like bench.py, it asserts nothing: the numbers are for reading.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def ticks(pids):
    total = 0
    for pid in pids:
        try:
            total += bench.proc_ticks(pid)
        except OSError:
            pass  # the process ended meanwhile
    return total


def postgres_pids():
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return out.split()


def machine():
    """(all jiffies, idle + iowait jiffies) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("binary")
    p.add_argument("--postgres", metavar="URL", help="run on a scratch database of this PostgreSQL server")
    p.add_argument("--scenario", default="rest_put", help="a scenario of bench.py's main table (default rest_put)")
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--duration", type=int, default=6, help="seconds per run")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--keys", type=int, default=10000)
    p.add_argument("--env", action="append", default=[], metavar="KVQL_X=V", help="server environment (repeatable)")
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="kvql-cpu-")
    dbname = None
    if args.postgres:
        dbname = f"kvql_cpu_{int(time.time())}"
        subprocess.run(["psql", args.postgres, "-q", "-c", f"CREATE DATABASE {dbname}"], check=True)
        url = bench.pg_url(args.postgres, dbname)
    else:
        url = f"sqlite://{tmp}/kvql.db?mode=rwc"
    env = dict(e.split("=", 1) for e in args.env)
    server = bench.Server(args.binary, url, env)
    try:
        server.start()
        token = bench.login(server)
        bench.preload(server, token, "k", args.keys)
        server.wait_idle(60)
        script = bench.scenario_scripts(token, args.keys, "cpu")[args.scenario]
        hz = os.sysconf("SC_CLK_TCK")
        for _ in range(args.runs):
            k0, p0, m0 = server.cpu_ticks(), ticks(postgres_pids()), machine()
            r = bench.run_wrk(server, script, args.conns, args.duration, tmp, args.scenario)
            k1, p1, m1 = server.cpu_ticks(), ticks(postgres_pids()), machine()
            n = r["requests"]
            idle = (m1[1] - m0[1]) / max(1, m1[0] - m0[0])
            line = (
                f"{args.scenario} c={args.conns}: {r['rps']:,.0f} req/s, p50 {r['p50_us'] / 1000:.2f} ms, "
                f"p99 {r['p99_us'] / 1000:.2f} ms; kvql {1e6 * (k1 - k0) / hz / n:.1f} µs/request"
            )
            if args.postgres:
                line += f", PostgreSQL {1e6 * (p1 - p0) / hz / n:.1f} µs/request"
            print(f"{line}; machine idle {idle:.0%}" + (f"; {r['errors']} errors" if r["errors"] else ""), flush=True)
        mem = bench.proc_status(server.proc.pid)
        print(f"server RSS {mem.get('VmRSS')}, anonymous {mem.get('RssAnon')}")
    finally:
        server.stop()
        if dbname:
            subprocess.run(["psql", args.postgres, "-q", "-c", f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"])


if __name__ == "__main__":
    main()
