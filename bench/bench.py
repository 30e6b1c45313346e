#!/usr/bin/env python3
"""kvql load benchmark. Run it through bench/run.sh, which builds the binary.

Starts kvql (release build) on a fresh database, pre-loads keys, drives each
scenario with wrk (-t1, on loopback) and reports req/s, p50, p99 and each
scenario's ratio to the in-process ceiling (GET /healthz: no auth, no
database) measured in the same run, plus the server's peak RSS. Absolute
numbers vary between machines; the ratios are what to compare.

The change feed (bench/feed.py): the time from a PUT to its event at a
steady write rate, over SSE and a GraphQL subscription, and fan-out of one
prefix's writes to 1,000 GraphQL subscribers (50 with --smoke).

Baselines, measured in the same run unless --smoke or --no-baselines:
Redis behind webdis (a throw-away redis-server and webdis on free ports) for
GET and SET, pgbench -S on a scratch database (dropped after) for GET when
--postgres is given, and etcd's put for durable writes; each printed beside
kvql's rows with kvql's req/s ÷ the baseline's.
"""

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ADMIN_PASSWORD = "bench-admin-password"
WRK_DONE = r"""
done = function(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"status_errors":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout))
end
"""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def proc_status(pid):
    """The fields of /proc/PID/status, e.g. {"VmRSS": "1234 kB", ...}."""
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def proc_ticks(pid):
    """CPU time of a process so far, in clock ticks (utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One kvql process."""

    def __init__(self, binary, db_url, env=None):
        self.binary = binary
        self.db_url = db_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.proc = None
        self.startup_s = None

    def start(self):
        env = dict(os.environ)
        env.update(
            KVQL_DATABASE_URL=self.db_url,
            KVQL_LISTEN=f"127.0.0.1:{self.port}",
            KVQL_BOOTSTRAP_ADMIN_PASSWORD=ADMIN_PASSWORD,
            KVQL_LOG="warn",
            KVQL_DATABASE_MAX_CONNECTIONS="8",
            # Every load generator connects from 127.0.0.1: the fan-out's
            # 1,000 subscribers and the rest would pass the default 1,024.
            KVQL_MAX_CONNECTIONS_PER_ADDRESS="0",
        )
        env.update(self.extra_env)
        t0 = time.monotonic()
        # A file, not a pipe: a pipe nobody reads fills up and, with logs at
        # `info` (one line per request), would measure the pipe.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [self.binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=self.log
        )
        deadline = t0 + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"kvql exited at start: {self.log.read().decode()}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.01)
        raise SystemExit("kvql did not become ready within 120 s")

    def rss_kib(self):
        fields = proc_status(self.proc.pid)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def anon_kib(self):
        """Resident anonymous memory: the RSS without mapped files (SQLite's
        readers map the database file, whose pages are the kernel's page cache)."""
        return int(proc_status(self.proc.pid).get("RssAnon", "0").split()[0])

    def cpu_ticks(self):
        return proc_ticks(self.proc.pid)

    def wait_idle(self, limit_s=120):
        """Waits until the server has used (almost) no CPU for a second, e.g.
        until the background checkpoint of a large load is done; seconds waited."""
        t0 = time.monotonic()
        last = self.cpu_ticks()
        while time.monotonic() - t0 < limit_s:
            time.sleep(1)
            now = self.cpu_ticks()
            if now - last <= 2:
                break
            last = now
        return time.monotonic() - t0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http(method, url, body=None, token=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def login(server, username="admin", password=ADMIN_PASSWORD):
    _, body = http("POST", server.base + "/login", {"username": username, "password": password})
    return body["access_token"]


def value(i):
    return {"id": i, "name": f"item {i}", "tags": ["bench", "kvql"], "score": i * 0.5, "active": True}


def preload(server, token, prefix, count, ttl=None):
    """PUTs `count` keys `{prefix}{i}` in batches of 1,000; returns seconds taken."""
    t0 = time.monotonic()
    for start in range(0, count, 1000):
        items = []
        for i in range(start, min(start + 1000, count)):
            item = {"key": f"{prefix}{i}", "data": value(i)}
            if ttl is not None:
                item["ttl"] = ttl
            items.append(item)
        status, body = http("PUT", server.base + "/api/batch/object?atomic=true", items, token)
        if status != 200 or body["failed"]:
            raise SystemExit(f"preload failed: {status} {body}")
    return time.monotonic() - t0


def lua(token, request_body, init=""):
    """A wrk script; `request_body` is Lua returning wrk.format(...)."""
    return f"""
local token = "{token}"
{init}
request = function()
{request_body}
end
{WRK_DONE}
"""


def lua_str(s):
    return json.dumps(s)


def scenario_scripts(token, nkeys, run_id):
    auth = '{["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}'
    body_value = '\'{"data":{"id":1,"name":"updated","tags":["bench","kvql"],"score":0.5,"active":true}}\''
    def gql(query, variables_lua):
        head = json.dumps({"query": query})[:-1] + ',"variables":'
        return f"  local b = '{head}' .. {variables_lua} .. '}}'\n  return wrk.format(\"POST\", \"/graphql\", {auth}, b)"

    rand_key = f"'\"k' .. math.random(0, {nkeys - 1}) .. '\"'"
    gql_get = gql(
        "query($k: String!) { object(key: $k) { key data version } }",
        "'{\"k\":' .. " + rand_key + " .. '}'",
    )
    gql_put = gql(
        "mutation($k: String!, $d: JSON) { putObject(input: {key: $k, data: $d}) { created object { version } } }",
        "'{\"k\":' .. " + rand_key + " .. ',\"d\":{\"id\":1,\"name\":\"updated\"}}'",
    )
    create = (
        'counter = counter + 1\n'
        f'  local b = \'{{"key":"new-{run_id}-\' .. tid .. \'-\' .. counter .. \'","data":{{"id":1,"name":"created"}}}}\'\n'
        f'  return wrk.format("POST", "/api/object", {auth}, b)'
    )
    return {
        "ceiling": lua(token, '  return wrk.format("GET", "/healthz")'),
        "rest_get": lua(
            token,
            f'  return wrk.format("GET", "/api/object/k" .. math.random(0, {nkeys - 1}), {auth})',
        ),
        "rest_put": lua(
            token,
            f'  return wrk.format("PUT", "/api/object/k" .. math.random(0, {nkeys - 1}), {auth}, {body_value})',
        ),
        "rest_create": lua(
            token,
            create,
            init="counter = 0\ntid = string.format('%x', math.random(0, 2^30))",
        ),
        "gql_object": lua(token, gql_get),
        "gql_put": lua(token, gql_put),
        "login": lua(
            token,
            '  return wrk.format("POST", "/login", {["Content-Type"] = "application/json"}, '
            + lua_str(json.dumps({"username": "admin", "password": ADMIN_PASSWORD}))
            + ")",
        ),
    }


def run_wrk(server, script, connections, seconds, tmpdir, name):
    path = os.path.join(tmpdir, f"{name}.lua")
    with open(path, "w") as f:
        # Seeded here, not from the clock inside the script: two runs seconds
        # apart whose wrk had used that many microseconds less CPU got the
        # same seed, hence the same "tid" and the same fresh keys, and every
        # create of the second run answered 409.
        f.write(f"math.randomseed({random.SystemRandom().randrange(1, 2**31)})\n")
        f.write(script)
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", path, server.base,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next((l for l in out.splitlines() if l.startswith("WRK_JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary for {name}:\n{out}")
    r = json.loads(line[len("WRK_JSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(r[k] for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts"))
    return r


def batch_script(token, run_id):
    """1,000-item batch puts, each on 1,000 fresh keys."""
    item = ('{"key":"batch-%s-%d-%d","data":{"id":%d,"name":"item %d","tags":["bench","kvql"],'
            '"score":%d.5,"active":true}}')
    return lua(token, f"""
  counter = counter + 1
  local parts = {{}}
  for i = 0, 999 do
    parts[#parts + 1] = string.format('{item}', tid, counter, i, i, i, i)
  end
  return wrk.format("PUT", "/api/batch/object",
    {{["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}},
    "[" .. table.concat(parts, ",") .. "]")""",
               init=f"counter = 0\ntid = '{run_id}-' .. string.format('%x', math.random(0, 2^30))")


def pg_url(base, dbname):
    """`base` (a postgres:// URL) with its database replaced by `dbname`."""
    return urllib.parse.urlsplit(base)._replace(path="/" + dbname).geturl()


@contextlib.contextmanager
def database(args, tmpdir, name):
    if args.postgres:
        dbname = f"kvql_bench_{name}_{int(time.time())}"
        base = args.postgres
        subprocess.run(["psql", base, "-q", "-c", f"CREATE DATABASE {dbname}"], check=True)
        url = pg_url(base, dbname)
        try:
            yield url
        finally:
            subprocess.run(
                ["psql", base, "-q", "-c", f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"],
                check=False,
            )
    else:
        yield f"sqlite://{tmpdir}/{name}.db?mode=rwc"


def fmt_row(name, c, r, ceiling):
    ratio = r["rps"] / ceiling if ceiling else 0
    err = f"  ({r['errors']} errors)" if r["errors"] else ""
    return f"| {name} | {c} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} | {ratio:.2f} |{err}"


def main_table(args, server, token, nkeys, seconds, run_id, tmpdir, results, out):
    scripts = scenario_scripts(token, nkeys, run_id)
    out("| scenario | conns | req/s | p50 ms | p99 ms | ratio to ceiling |")
    out("|---|---|---|---|---|---|")
    order = ["ceiling", "rest_get", "gql_object", "rest_put", "rest_create", "gql_put", "login"]
    if args.only:
        order = ["ceiling"] + [n for n in args.only.split(",") if n not in ("ceiling", "hostile", "feed")]
    for c in [int(x) for x in args.conns.split(",")]:
        ceiling = None
        for name in order:
            log(f"{name} c={c}")
            r = run_wrk(server, scripts[name], c, seconds, tmpdir, f"{name}-{c}")
            if name == "ceiling":
                ceiling = r["rps"]
            results["scenarios"][f"{name}@{c}"] = r
            out(fmt_row(name, c, r, ceiling))


def extras(args, server, url, token, seconds, run_id, tmpdir, big, expiring, smoke, results, out):
    log("batch put of 1000 items")
    b = run_wrk(server, batch_script(token, run_id), 1, seconds, tmpdir, "batch")
    results["batch_put_1000"] = b
    out()
    out(f"1,000-item batch put (PUT /api/batch/object, fresh keys, one at a time, {b['requests']} requests): "
        f"p50 {b['p50_us'] / 1000:.1f} ms, p99 {b['p99_us'] / 1000:.1f} ms, {b['rps'] * 1000:,.0f} items/s"
        + (f" ({b['errors']} errors)" if b["errors"] else ""))

    # Flat latency: GET from a tenant with few keys vs one with many.
    env = dict(os.environ, KVQL_DATABASE_URL=url)
    for user in ("small", "large"):
        added = subprocess.run(
            [args.binary, "user", "add", user, "--tenant", user, "--password-stdin"],
            input="bench password\n", text=True, env=env, capture_output=True)
        if added.returncode != 0:
            sys.exit(f"bench: kvql user add {user} failed: {added.stderr.strip()}")
    small_token = login(server, "small", "bench password")
    large_token = login(server, "large", "bench password")
    log("pre-loading 1000 keys (small tenant)")
    preload(server, small_token, "k", 1000)
    log(f"pre-loading {big} keys (large tenant)")
    t_big = preload(server, large_token, "k", big)
    out(f"Pre-loading {big:,} keys with 1,000-item batch puts took {t_big:.1f} s ({big / t_big:,.0f} keys/s).")
    results["tokens"] = {"small": small_token, "large": large_token}
    idle = server.wait_idle()
    out(f"The server kept working for {idle:.0f} s after that load (SQLite: checkpointing); measured after.")
    cache = "with the read cache" if not args.postgres else "PostgreSQL, no read cache"
    flat_table(server, {"small": small_token, "large": large_token}, big, seconds, tmpdir, results, out,
               f"GET latency by tenant size, {cache} (c=32):", "cached")

    # Sweeper impact: GET p99 while many keys expire at once.
    ttl = 20 if not smoke else 8
    log(f"pre-loading {expiring} keys expiring together in {ttl} s")
    t0 = time.monotonic()
    preload(server, small_token, "exp", expiring, ttl=ttl)
    expiry_at = t0 + ttl
    script = lua(small_token, '  return wrk.format("GET", "/api/object/k" .. math.random(0, 999), '
                              '{["Authorization"] = "Bearer " .. token})')
    before = run_wrk(server, script, 32, 2, tmpdir, "sweep-before")
    wait = expiry_at - time.monotonic() - 0.5
    if wait > 0:
        time.sleep(wait)
    during = run_wrk(server, script, 32, 4, tmpdir, "sweep-during")
    results["sweeper"] = {"before": before, "during": during}
    out()
    out(f"Sweeper impact: GET p99 {before['p99_us'] / 1000:.2f} ms before, "
        f"{during['p99_us'] / 1000:.2f} ms while {expiring:,} keys expire and are swept "
        f"(p50 {before['p50_us'] / 1000:.2f} → {during['p50_us'] / 1000:.2f} ms).")


def feed_scenarios(args, url, seconds, smoke, results, out):
    """Write-to-event latency and fan-out (bench/feed.py), on a server of
    their own that lets one user open enough WebSockets and feeds."""
    import feed

    subscribers = 50 if smoke else 1000
    rate, fan_rate = (50, 5) if smoke else (200, 20)
    # The subscribers connect at once, all as one user, each anonymous until
    # its connection_init, each holding one change feed: the three limits are
    # raised above their number.
    env = {
        "KVQL_WS_MAX_CONNECTIONS_PER_USER": str(subscribers + 10),
        "KVQL_WS_MAX_ANONYMOUS_CONNECTIONS": str(subscribers + 10),
        "KVQL_MAX_FEEDS_PER_USER": str(subscribers + 10),
    }
    server = Server(args.binary, url, env=env).start()
    # On PostgreSQL, a second node of the same database: a subscriber there
    # hears of the first node's writes through NOTIFY and the change log.
    other = None
    try:
        if args.postgres:
            other = Server(args.binary, url, env=env).start()
        token = login(server)
        log(f"change feed: latency at {rate} writes/s, fan-out to {subscribers} subscribers"
            + (", a subscriber on a second node" if other else ""))
        found = feed.scenarios(server.port, token, seconds, subscribers, rate, fan_rate,
                               other.port if other else None)
    finally:
        if other:
            other.stop()
        server.stop()
    results["feed"] = found
    out()
    out(f"Change feed, write to event (PUT sent → event read by a Python client; {seconds} s per row):")
    out()
    out("| scenario | writes/s made (asked) | subscribers | events | delivered | p50 ms | p99 ms | max ms |")
    out("|---|---|---|---|---|---|---|---|")
    rows = [("SSE /api/watch", found["feed_latency_sse"], rate),
            ("GraphQL objectEvents", found["feed_latency_graphql"], rate),
            ("GraphQL fan-out, one prefix", found["feed_fan_out"], fan_rate)]
    if "feed_latency_other_node" in found:
        rows.append(("SSE /api/watch on a second node (writes on the first)",
                     found["feed_latency_other_node"], rate))
    for name, r, w in rows:
        out(f"| {name} | {r['writes'] / seconds:.1f} ({w}) | {r['subscribers']:,} | {r['events']:,} | {r['delivered']:.1%} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |")


def hostile_documents():
    """GraphQL documents an anonymous attacker would send: fragments that
    double at each of 31 levels (2^31 selections once expanded, ~1 KB) and a
    list literal nested 1,600 deep. Both must be refused cheaply."""
    fragments = "query { ...F31 }\nfragment F0 on Query { __typename }\n" + "".join(
        f"fragment F{i} on Query {{ ...F{i - 1} ...F{i - 1} }}\n" for i in range(1, 32))
    nested = "{object(key:" + "[" * 1600 + "]" * 1600 + "){key}}"
    return [json.dumps({"query": q}) for q in (fragments, nested)]


def hostile(server, token, nkeys, seconds, tmpdir, results, out):
    """Authenticated GETs and /healthz alone, then beside 3 connections
    sending hostile documents without a token."""
    bodies = ", ".join(lua_str(b) for b in hostile_documents())
    attack = lua(None, '  i = i % 2 + 1\n  return wrk.format("POST", "/graphql", '
                       '{["Content-Type"] = "application/json"}, bodies[i])',
                 init=f"bodies = {{{bodies}}}\ni = 0")
    scripts = scenario_scripts(token, nkeys, "hostile")
    rows = {}
    for name in ("rest_get", "ceiling"):
        log(f"{name} c=32 alone")
        rows[(name, "alone")] = run_wrk(server, scripts[name], 32, seconds, tmpdir, f"{name}-alone")
        log(f"{name} c=32 beside hostile documents")
        box = {}
        t = threading.Thread(target=lambda: box.update(
            r=run_wrk(server, attack, 3, seconds, tmpdir, f"attack-{name}")))
        t.start()
        rows[(name, "attacked")] = run_wrk(server, scripts[name], 32, seconds, tmpdir, f"{name}-attacked")
        t.join()
        rows[(name, "attack")] = box["r"]
    results["hostile"] = {f"{n}_{k}": r for (n, k), r in rows.items()}
    out()
    out("Hostile GraphQL documents (3 connections, no token: doubling fragments and a 1,600-deep list, "
        "alternately) beside c=32:")
    out()
    out("| measured | req/s | p50 ms | p99 ms |")
    out("|---|---|---|---|")
    for name, label in (("rest_get", "REST GET"), ("ceiling", "GET /healthz")):
        for kind, what in (("alone", "alone"), ("attacked", "beside hostile documents")):
            r = rows[(name, kind)]
            out(f"| {label}, {what} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} |")
        a = rows[(name, "attack")]
        err = f" ({a['errors']} errors)" if a["errors"] else ""
        out(f"| hostile documents refused (beside {label}) | {a['rps']:,.0f} | {a['p50_us'] / 1000:.2f} "
            f"| {a['p99_us'] / 1000:.2f} |{err}")


def flat_table(server, tokens, big, seconds, tmpdir, results, out, title, label):
    out()
    out(title)
    out()
    out("| tenant keys | req/s | p50 ms | p99 ms |")
    out("|---|---|---|---|")
    for name, n in (("small", 1000), ("large", big)):
        script = lua(tokens[name], f'  return wrk.format("GET", "/api/object/k" .. math.random(0, {n - 1}), '
                                   '{["Authorization"] = "Bearer " .. token})')
        r = run_wrk(server, script, 32, seconds, tmpdir, f"flat-{label}-{n}")
        results["scenarios"][f"get_{label}_tenant_{n}"] = r
        out(f"| {n:,} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} |"
            + (f" ({r['errors']} errors)" if r["errors"] else ""))


class Etcd:
    """A one-member etcd, the durable-write baseline: its JSON gateway's
    put, fsync'd before it answers, measured on this machine in this run."""

    def __init__(self, binary, tmpdir):
        self.port, peer = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.proc = subprocess.Popen(
            [binary, "--data-dir", os.path.join(tmpdir, "etcd"),
             "--listen-client-urls", self.base, "--advertise-client-urls", self.base,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"default={peer_url}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                http("POST", self.base + "/v3/kv/range", {"key": "YQ=="}, timeout=1)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.05)
        self.stop()
        raise SystemExit("etcd did not answer within 30 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


# Keys of 8 digits are valid base64, as etcd's gateway wants.
ETCD_PUT = """
request = function()
  local body = '{"key":"' .. string.format("%%08d", math.random(0, %d)) .. '","value":"eyJpZCI6MSwibmFtZSI6InVwZGF0ZWQifQ=="}'
  return wrk.format("POST", "/v3/kv/put", {["Content-Type"] = "application/json"}, body)
end
"""


def etcd_puts(args, tmpdir, nkeys, seconds, results):
    """etcd put req/s by connection count, or None when etcd is not installed."""
    binary = shutil.which("etcd")
    if binary is None:
        return None
    etcd = Etcd(binary, tmpdir)
    try:
        rates = {}
        for c in [int(x) for x in args.conns.split(",")]:
            log(f"etcd put c={c}")
            r = run_wrk(etcd, ETCD_PUT % (nkeys - 1) + WRK_DONE, c, seconds, tmpdir, f"etcd-{c}")
            results["scenarios"][f"etcd_put@{c}"] = r
            rates[c] = r["rps"]
        return rates
    finally:
        etcd.stop()


def durable(args, tmpdir, nkeys, seconds, run_id, with_baselines, results, out):
    etcd = etcd_puts(args, tmpdir, nkeys, seconds, results) if with_baselines else None
    with database(args, tmpdir, "durable") as url:
        server = Server(args.binary, url, env={"KVQL_SQLITE_SYNCHRONOUS": "full"}).start()
        try:
            token = login(server)
            preload(server, token, "k", nkeys)
            scripts = scenario_scripts(token, nkeys, run_id)
            out()
            out("Full durability (KVQL_SQLITE_SYNCHRONOUS=full: fsync before every acknowledgement):")
            out()
            out("| scenario | conns | req/s | p50 ms | p99 ms | ratio to ceiling |")
            out("|---|---|---|---|---|---|")
            for c in [int(x) for x in args.conns.split(",")]:
                ceiling = run_wrk(server, scripts["ceiling"], c, seconds, tmpdir, f"dceil-{c}")
                if etcd is not None:
                    r = results["scenarios"][f"etcd_put@{c}"]
                    out(fmt_row("etcd put (baseline)", c, r, ceiling["rps"]))
                for name in ("rest_put", "rest_create"):
                    log(f"durable {name} c={c}")
                    r = run_wrk(server, scripts[name], c, seconds, tmpdir, f"durable-{name}-{c}")
                    results["scenarios"][f"durable_{name}@{c}"] = r
                    out(fmt_row(f"{name} (full)", c, r, ceiling["rps"]))
                    if etcd is not None:
                        results["scenarios"][f"durable_{name}@{c}"]["vs_etcd"] = r["rps"] / etcd[c]
            out()
            if etcd is None and not with_baselines:
                out("Baselines skipped (--smoke or --no-baselines): no etcd baseline in this run.")
            elif etcd is None:
                out("etcd is not installed (apt-get install etcd-server): no etcd baseline in this run.")
            else:
                out("Full-durability writes against etcd's put in this run (one etcd member, its JSON "
                    "gateway, fsync'd): " + "; ".join(
                        f"c={c}: PUT {results['scenarios'][f'durable_rest_put@{c}']['vs_etcd']:.2f}x, "
                        f"create {results['scenarios'][f'durable_rest_create@{c}']['vs_etcd']:.2f}x"
                        for c in sorted(etcd)) + ".")
        finally:
            server.stop()


def resp(*args):
    """One Redis command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class Webdis:
    """The in-memory baseline: a throw-away redis-server (no persistence, on a
    free port) behind webdis, Redis's HTTP/JSON gateway, measured on this
    machine in this run with the same wrk settings as kvql."""

    THREADS = 2  # webdis's HTTP threads; redis itself answers on one

    def __init__(self, redis_binary, webdis_binary, tmpdir):
        self.redis_port, self.port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        workdir = os.path.join(tmpdir, "webdis")
        os.makedirs(workdir, exist_ok=True)
        self.procs = []
        try:
            self.procs.append(subprocess.Popen(
                [redis_binary, "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
                 "--appendonly", "no", "--dir", workdir, "--daemonize", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            self._wait(self._redis_ready, "redis-server")
            config = os.path.join(workdir, "webdis.json")
            with open(config, "w") as f:
                json.dump({
                    "redis_host": "127.0.0.1", "redis_port": self.redis_port, "redis_auth": None,
                    "http_host": "127.0.0.1", "http_port": self.port, "threads": self.THREADS,
                    "daemonize": False, "database": 0, "verbosity": 0,
                    "logfile": os.path.join(workdir, "webdis.log"),
                }, f)
            self.procs.append(subprocess.Popen(
                [webdis_binary, config], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            self._wait(self._webdis_ready, "webdis")
        except BaseException:
            self.stop()
            raise

    def _wait(self, ready, what):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"{what} exited at start")
            try:
                if ready():
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.05)
        raise SystemExit(f"{what} did not answer within 30 s")

    def _redis_ready(self):
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
            s.sendall(resp("PING"))
            return s.recv(64).startswith(b"+PONG")

    def _webdis_ready(self):
        return http("GET", self.base + "/PING", timeout=1)[1] == {"PING": [True, "PONG"]}

    def preload(self, count):
        """SETs `count` keys k0… to the JSON values kvql's keys hold (MSET, 1,000 a time)."""
        with socket.create_connection(("127.0.0.1", self.redis_port), timeout=30) as s:
            replies = s.makefile("rb")
            for start in range(0, count, 1000):
                args = ["MSET"]
                for i in range(start, min(start + 1000, count)):
                    args += [f"k{i}", json.dumps(value(i), separators=(",", ":"))]
                s.sendall(resp(*args))
                reply = replies.readline()
                if reply != b"+OK\r\n":
                    raise SystemExit(f"redis preload failed: {reply!r}")
        _, body = http("GET", self.base + "/DBSIZE")
        if body != {"DBSIZE": count}:
            raise SystemExit(f"redis holds {body} keys after the preload, not {count}")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def webdis_scripts(nkeys):
    """GET and SET of a random pre-loaded key through webdis; SET's value
    (the PUT body, as webdis takes the last argument) is kvql's rest_put data."""
    data = lua_str(json.dumps({"id": 1, "name": "updated", "tags": ["bench", "kvql"], "score": 0.5,
                               "active": True}, separators=(",", ":")))
    return {
        "get": lua(None, f'  return wrk.format("GET", "/GET/k" .. math.random(0, {nkeys - 1}))'),
        "set": lua(None, f'  return wrk.format("PUT", "/SET/k" .. math.random(0, {nkeys - 1}), nil, {data})'),
    }


def webdis_baseline(conns, get, put, nkeys, seconds, tmpdir, results):
    """redis+webdis GET/SET by connection count into results; False when
    redis-server or webdis is not installed."""
    redis_binary, webdis_binary = shutil.which("redis-server"), shutil.which("webdis")
    if redis_binary is None or webdis_binary is None:
        return False
    webdis = Webdis(redis_binary, webdis_binary, tmpdir)
    try:
        webdis.preload(nkeys)
        scripts = webdis_scripts(nkeys)
        for c in conns:
            for op, on in (("get", get), ("set", put)):
                if on:
                    log(f"redis+webdis {op.upper()} c={c}")
                    r = run_wrk(webdis, scripts[op], c, seconds, tmpdir, f"webdis-{op}-{c}")
                    results["scenarios"][f"webdis_{op}@{c}"] = r
        return True
    finally:
        webdis.stop()


def run_pgbench(pgbench, url, mode, c, seconds):
    cmd = [pgbench, "-n", "-S", "-M", mode, "-c", str(c), "-j", "1", "-T", str(seconds), url]
    p = subprocess.run(cmd, capture_output=True, text=True)
    tps = re.search(r"^tps = ([0-9.]+)", p.stdout, re.M)
    if tps is None:
        raise SystemExit(f"pgbench printed no tps ({' '.join(cmd)}):\n{p.stdout}{p.stderr}")

    def number(pattern):
        m = re.search(pattern, p.stdout, re.M)
        return float(m.group(1)) if m else 0

    return {
        "mode": mode,
        "requests": int(number(r"^number of transactions actually processed: (\d+)")),
        "duration_us": seconds * 1_000_000,
        "rps": float(tps.group(1)),
        "latency_avg_us": number(r"^latency average = ([0-9.]+) ms") * 1000,
        "errors": int(number(r"^number of failed transactions: (\d+)")) + (p.returncode != 0),
    }


def pgbench_baseline(args, conns, seconds, run_id, results):
    """`pgbench -S` (prepared, and extended for information) on a scratch
    database of the --postgres server, dropped after; False when pgbench or
    psql is not installed."""
    pgbench, psql = shutil.which("pgbench"), shutil.which("psql")
    if pgbench is None or psql is None:
        return False
    dbname = f"kvql_bench_pgbench_{run_id}"
    url = pg_url(args.postgres, dbname)

    def sql(statement):
        p = subprocess.run([psql, args.postgres, "-q", "-c", statement], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"psql failed ({statement}): {p.stderr}")

    sql(f"CREATE DATABASE {dbname}")
    try:
        log(f"pgbench -i -s 1 on the scratch database {dbname}")
        p = subprocess.run([pgbench, "-i", "-s", "1", "-q", url], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"pgbench -i failed: {p.stderr}")
        for c in conns:
            for mode in ("prepared", "extended"):
                log(f"pgbench -S -M {mode} c={c}")
                results["scenarios"][f"pgbench_{mode}@{c}"] = run_pgbench(pgbench, url, mode, c, seconds)
        return True
    finally:
        sql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def baselines(args, nkeys, seconds, run_id, tmpdir, results, out):
    """Other servers doing what kvql's rest_get and rest_put do, measured in
    this run at the main table's connection counts: Redis behind webdis (the
    in-memory baseline for GET and SET) and, on PostgreSQL, pgbench's
    select-only transaction (the baseline for GET). Printed beside kvql's
    rows with kvql's req/s ÷ the baseline's."""
    only = args.only.split(",") if args.only else None
    get = only is None or "rest_get" in only
    put = only is None or "rest_put" in only
    if not (get or put):
        return
    conns = [int(x) for x in args.conns.split(",")]
    sc = results["scenarios"]
    has_webdis = webdis_baseline(conns, get, put, nkeys, seconds, tmpdir, results)
    has_pgbench = bool(args.postgres) and get and pgbench_baseline(args, conns, seconds, run_id, results)
    results["baselines"] = {
        "webdis": {"get": get, "set": put, "threads": Webdis.THREADS} if has_webdis else None,
        "pgbench": {"scale": 1, "threads": 1, "modes": ["prepared", "extended"]} if has_pgbench else None,
    }

    def row(name, c, r, kvql=None, key=None):
        ratio = ""
        if kvql is not None:
            kvql[key] = kvql["rps"] / r["rps"] if r["rps"] else 0
            ratio = f"{kvql[key]:.2f}"
        if "p50_us" in r:
            lat = f"{r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f}"
        else:
            lat = "— | —"
        note = f"  (average latency {r['latency_avg_us'] / 1000:.2f} ms)" if "latency_avg_us" in r else ""
        err = f"  ({r['errors']} errors)" if r["errors"] else ""
        out(f"| {name} | {c} | {r['rps']:,.0f} | {lat} | {ratio} |{note}{err}")

    out()
    if has_webdis or has_pgbench:
        how = [w for w, on in (("redis+webdis driven by wrk -t1", has_webdis),
                               ("pgbench -j 1 on a scratch database", has_pgbench)) if on]
        out(f"Baselines measured in this run at the same connection counts ({'; '.join(how)}); "
            "last column: kvql's req/s ÷ the baseline's:")
        out()
        out("| scenario | conns | req/s | p50 ms | p99 ms | kvql ÷ baseline |")
        out("|---|---|---|---|---|---|")
        for c in conns:
            if get:
                kvql = sc[f"rest_get@{c}"]
                row("rest_get", c, kvql)
                if has_webdis:
                    row("redis+webdis GET (baseline)", c, sc[f"webdis_get@{c}"], kvql, "vs_webdis")
                if has_pgbench:
                    row("pgbench -S -M prepared (baseline)", c, sc[f"pgbench_prepared@{c}"], kvql,
                        "vs_pgbench_prepared")
                    row("pgbench -S -M extended (for information)", c, sc[f"pgbench_extended@{c}"], kvql,
                        "vs_pgbench_extended")
            if put and has_webdis:
                kvql = sc[f"rest_put@{c}"]
                row("rest_put", c, kvql)
                row("redis+webdis SET (baseline)", c, sc[f"webdis_set@{c}"], kvql, "vs_webdis")
        out()
        summary = []
        for c in conns:
            parts = []
            if get and has_webdis:
                parts.append(f"GET {sc[f'rest_get@{c}']['vs_webdis']:.2f}x redis+webdis")
            if get and has_pgbench:
                parts.append(f"GET {sc[f'rest_get@{c}']['vs_pgbench_prepared']:.2f}x pgbench -S -M prepared")
            if put and has_webdis:
                parts.append(f"PUT {sc[f'rest_put@{c}']['vs_webdis']:.2f}x redis+webdis SET")
            summary.append(f"c={c}: " + ", ".join(parts))
        out("kvql against the baselines: " + "; ".join(summary) + ".")
    if not has_webdis:
        out("redis-server or webdis is not installed (apt-get install redis-server webdis): "
            "no redis+webdis baseline in this run.")
    if args.postgres and get and not has_pgbench:
        out("pgbench or psql is not installed (it ships with PostgreSQL): no pgbench baseline in this run.")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/kvql")
    p.add_argument("--smoke", action="store_true", help="a few seconds per scenario, small data (CI)")
    p.add_argument("--postgres", metavar="URL", help="run on a fresh database of this PostgreSQL server")
    p.add_argument("--duration", type=int, help="seconds per scenario (default 10, smoke 2)")
    p.add_argument("--keys", type=int, help="keys pre-loaded for GET/PUT (default 10000, smoke 1000)")
    p.add_argument("--big", type=int, help="keys for the flat-latency check (default 1000000, smoke 20000)")
    p.add_argument("--expiring", type=int, help="keys expiring at once in the sweeper check (default 100000, smoke 5000)")
    p.add_argument("--out", help="results file (default bench/results/<time>.md)")
    p.add_argument("--only", help="comma-separated scenarios of the main table, and 'hostile' or 'feed' for "
                        "those sections; skips the other measurements except the baselines of rest_get "
                        "and rest_put")
    p.add_argument("--conns", default="32,64", help="connection counts (default 32,64)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the baselines (redis+webdis, pgbench, etcd); --smoke always skips them")
    args = p.parse_args()

    smoke = args.smoke
    seconds = args.duration or (2 if smoke else 10)
    nkeys = args.keys or (1000 if smoke else 10_000)
    big = args.big or (20_000 if smoke else 1_000_000)
    expiring = args.expiring or (5_000 if smoke else 100_000)
    backend = "PostgreSQL" if args.postgres else "SQLite"
    run_id = f"{int(time.time())}"
    with_baselines = not smoke and not args.no_baselines
    tmpdir = tempfile.mkdtemp(prefix="kvql-bench-")
    lines = []
    results = {"backend": backend, "smoke": smoke, "seconds": seconds, "scenarios": {}}

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    try:
        with database(args, tmpdir, "main") as url:
            server = Server(args.binary, url).start()
            try:
                token = login(server)
                log(f"pre-loading {nkeys} keys")
                preload(server, token, "k", nkeys)
                out(f"# kvql benchmark — {backend}, {datetime.datetime.now().isoformat(timespec='seconds')}")
                out()
                out(f"wrk -t1, {seconds} s per scenario, {nkeys} keys pre-loaded, release build, loopback, "
                    f"{os.cpu_count()} CPUs. Ratio = req/s ÷ the ceiling (GET /healthz) at the same concurrency.")
                out()
                main_table(args, server, token, nkeys, seconds, run_id, tmpdir, results, out)
                rss, hwm = server.rss_kib()
                results["rss_after_table_kib"] = rss
                out()
                anon = server.anon_kib()
                results["anon_after_table_kib"] = anon
                out(f"Server RSS after the scenarios above: {rss / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB), "
                    f"{anon / 1024:.0f} MiB of it anonymous (the rest: mapped database file, page cache).")
                if with_baselines:
                    baselines(args, nkeys, seconds, run_id, tmpdir, results, out)
                if not args.only or "hostile" in args.only.split(","):
                    hostile(server, token, nkeys, seconds, tmpdir, results, out)
                if not args.only:
                    extras(args, server, url, token, seconds, run_id, tmpdir, big, expiring, smoke, results, out)
                rss, hwm = server.rss_kib()
                results["rss_kib"] = rss
                results["peak_rss_kib"] = hwm
                anon = server.anon_kib()
                results["anon_kib"] = anon
                out()
                out(f"Server RSS at the end (after loading {big:,} more keys): {rss / 1024:.0f} MiB, "
                    f"{anon / 1024:.0f} MiB of it anonymous; peak RSS during the whole run: {hwm / 1024:.0f} MiB.")
            finally:
                server.stop()

            if not args.only or "feed" in args.only.split(","):
                feed_scenarios(args, url, seconds, smoke, results, out)

            if not args.only:
                # Restart on the now large database, without the read cache, so
                # that every GET below goes through the database index.
                again = Server(args.binary, url, env={"KVQL_CACHE_BYTES": "0"}).start()
                try:
                    results["startup_s"] = again.startup_s
                    out()
                    out(f"Startup on the existing database ({big + nkeys + 1000:,}+ keys): "
                        f"{again.startup_s * 1000:.0f} ms to ready.")
                    flat_table(again, results.pop("tokens"), big, seconds, tmpdir, results, out,
                               "GET latency by tenant size, read cache off (every GET reads the index, c=32):",
                               "uncached")
                finally:
                    again.stop()

        if not args.postgres and not args.only:
            durable(args, tmpdir, nkeys, seconds, run_id, with_baselines, results, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    out_path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-smoke" if smoke else "") + ".md",
    )
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(results, f, indent=2)
    log(f"results written to {out_path}")
    checked = dict(results["scenarios"])
    if "batch_put_1000" in results:
        checked["batch_put_1000"] = results["batch_put_1000"]
    bad = {k: v["errors"] for k, v in checked.items() if v["errors"]}
    if bad:
        log(f"some requests failed: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
