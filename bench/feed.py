"""Change feed scenarios of the benchmark (see bench.py): how long a write
takes to reach the clients that follow it.

- latency: one writer PUTs at a steady rate under one prefix, followed by one
  Server-Sent Events stream (GET /api/watch) and one GraphQL subscription
  (objectEvents over graphql-transport-ws); for each event, the time from
  the moment the writer sent the PUT to the moment the client read it.
- fan-out: the same writer and N GraphQL subscribers (default 1,000) of one
  prefix on N WebSockets; the same latency over every event delivered, and
  how many of the events due arrived.

Each value written carries the writer's clock reading (time.monotonic(),
one process), so no two clocks are compared. The clients are Python
(asyncio, a minimal WebSocket client below): the figures include their own
time to read and parse, on the same machine as the server.
"""

import asyncio
import base64
import http.client
import json
import os
import threading
import time
import urllib.parse


class WebSocket:
    """The client side of RFC 6455, enough for graphql-transport-ws: masked
    text frames out, unfragmented frames in, pings answered."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port, path, protocol):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
             f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n").encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"WebSocket upgrade refused: {status.decode(errors='replace')}")
        return cls(reader, writer)

    def _frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 1 << 16:
            head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        return head + mask + masked

    async def send(self, message):
        self.writer.write(self._frame(0x1, json.dumps(message).encode()))
        await self.writer.drain()

    async def recv(self):
        """The next text message, parsed; raises ConnectionError when closed."""
        while True:
            head = await self.reader.readexactly(2)
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            payload = await self.reader.readexactly(n)
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError(f"closed: {payload[:2].hex()} {payload[2:].decode(errors='replace')}")
            if opcode == 0x9:
                self.writer.write(self._frame(0xA, payload))

    def close(self):
        self.writer.close()


SUBSCRIPTION = "subscription($p: String!) { objectEvents(prefix: $p) { revision object { data } } }"


async def subscriber(port, token, prefix, on_event, ready):
    """A graphql-transport-ws client following `prefix`: calls on_event(data,
    received_at) per event; sets `ready` once subscribed."""
    ws = await WebSocket.connect(port, "/graphql/ws", "graphql-transport-ws")
    try:
        await ws.send({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        ack = await ws.recv()
        if ack.get("type") != "connection_ack":
            raise ConnectionError(f"no connection_ack: {ack}")
        await ws.send({"id": "1", "type": "subscribe",
                       "payload": {"query": SUBSCRIPTION, "variables": {"p": prefix}}})
        ready()
        while True:
            msg = await ws.recv()
            kind = msg.get("type")
            if kind == "next":
                event = msg["payload"]["data"]["objectEvents"]
                on_event(event["object"]["data"], time.monotonic())
            elif kind == "ping":
                await ws.send({"type": "pong"})
            elif kind in ("error", "complete"):
                raise ConnectionError(f"subscription ended: {msg}")
    finally:
        ws.close()


async def sse(port, token, prefix, on_event, ready):
    """GET /api/watch?prefix=...: calls on_event(data, received_at) per change."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (f"GET /api/watch?prefix={urllib.parse.quote(prefix, safe='')} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
         f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n").encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"watch refused: {head.decode(errors='replace')}")
    chunked = b"chunked" in head.lower()
    ready()
    buffer = b""
    try:
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    raise ConnectionError("watch stream ended")
                buffer += await reader.readexactly(size + 2)
                buffer = buffer[:-2] if buffer.endswith(b"\r\n") else buffer
            else:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("watch stream ended")
                buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        on_event(json.loads(line[5:])["data"], time.monotonic())
    finally:
        writer.close()


def writer(port, token, prefix, rate, stop, sent):
    """PUTs {"t": monotonic} under `prefix` at `rate` per second until `stop`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    interval = 1.0 / rate
    next_at = time.monotonic()
    i = 0
    while not stop.is_set():
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        body = json.dumps({"data": {"t": time.monotonic(), "i": i}})
        conn.request("PUT", object_path(f"{prefix}{i % 100}"), body, headers)
        response = conn.getresponse()
        response.read()
        if response.status not in (200, 201):
            raise SystemExit(f"feed writer: PUT answered {response.status}")
        sent.append(i)
        i += 1
    conn.close()


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def object_path(key):
    return "/api/object/" + urllib.parse.quote(key, safe="")


def put(port, token, key, data):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("PUT", object_path(key), json.dumps({"data": data}),
                 {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status not in (200, 201):
        raise SystemExit(f"feed: PUT {key} answered {response.status}")


def measure(port, token, prefix, rate, seconds, clients):
    """Runs `clients` (coroutine factories taking (on_event, ready)) while the
    writer PUTs to the server on `port` at `rate` for `seconds`; per client,
    the latencies (ms) of the writes' events, and how many writes were made.
    The clients may follow another node of the same database."""
    n = len(clients)
    latencies = [[] for _ in range(n)]

    async def main():
        loop = asyncio.get_running_loop()
        state = {"ready": 0, "warm": 0}
        warmed = [False] * n
        all_ready, all_warm = asyncio.Event(), asyncio.Event()

        def ready():
            state["ready"] += 1
            if state["ready"] == n:
                all_ready.set()

        def listener(k):
            def on_event(data, at):
                if "i" in data:
                    latencies[k].append((at - data["t"]) * 1000)
                elif not warmed[k]:
                    warmed[k] = True
                    state["warm"] += 1
                    if state["warm"] == n:
                        all_warm.set()
            return on_event

        tasks = [asyncio.ensure_future(make(listener(k), ready)) for k, make in enumerate(clients)]

        def check():
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception():
                    raise SystemExit(f"feed: a client failed: {t.exception()!r}")

        deadline = time.monotonic() + 120
        while not all_ready.is_set():
            check()
            if time.monotonic() > deadline:
                raise SystemExit(f"feed: only {state['ready']} of {n} clients connected")
            await asyncio.sleep(0.1)
        # Subscribed is not yet followed on the server: a marker is written
        # until every client has seen one.
        while not all_warm.is_set():
            check()
            if time.monotonic() > deadline:
                raise SystemExit(f"feed: only {state['warm']} of {n} clients saw the warm-up write")
            await loop.run_in_executor(None, put, port, token, f"{prefix}warmup", {"warmup": True})
            try:
                await asyncio.wait_for(all_warm.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
        stop, sent = threading.Event(), []
        thread = threading.Thread(target=writer, args=(port, token, prefix, rate, stop, sent), daemon=True)
        thread.start()
        await asyncio.sleep(seconds)
        stop.set()
        await loop.run_in_executor(None, thread.join)
        # The last events in flight: until none has come for a second (a
        # client loop that fell behind, e.g. a thousand sockets in one Python
        # process, is still reading), at most 30 s.
        quiet_until = time.monotonic() + 30
        seen = -1
        while time.monotonic() < quiet_until:
            now_seen = sum(len(per) for per in latencies)
            if now_seen == seen:
                break
            seen = now_seen
            await asyncio.sleep(1.0)
        check()
        for t in tasks:
            t.cancel()
        return len(sent)

    written = asyncio.run(main())
    return latencies, written


def summary(latencies, written, subscribers):
    """p50, p99, max (ms) over every event, and the share of the events due
    that arrived."""
    flat = sorted(x for per in latencies for x in per)
    due = written * subscribers
    return {
        "writes": written,
        "subscribers": subscribers,
        "events": len(flat),
        "delivered": len(flat) / due if due else float("nan"),
        "p50_ms": percentile(flat, 50),
        "p99_ms": percentile(flat, 99),
        "max_ms": flat[-1] if flat else float("nan"),
    }


def scenarios(port, token, seconds, subscribers, rate, fan_rate, other_port=None):
    """The scenarios, and with `other_port` (a second node of the same
    PostgreSQL database) the latency of an SSE subscriber there to the
    writes made on `port`; their summaries."""
    results = {}
    if other_port is not None:
        latencies, written = measure(
            port, token, "far/", rate, seconds,
            [lambda on_event, ready: sse(other_port, token, "far/", on_event, ready)],
        )
        results["feed_latency_other_node"] = summary([latencies[0]], written, 1)
    latencies, written = measure(
        port, token, "lat/", rate, seconds,
        [lambda on_event, ready: sse(port, token, "lat/", on_event, ready),
         lambda on_event, ready: subscriber(port, token, "lat/", on_event, ready)],
    )
    results["feed_latency_sse"] = summary([latencies[0]], written, 1)
    results["feed_latency_graphql"] = summary([latencies[1]], written, 1)
    latencies, written = measure(
        port, token, "fan/", fan_rate, seconds,
        [lambda on_event, ready: subscriber(port, token, "fan/", on_event, ready)
         for _ in range(subscribers)],
    )
    results["feed_fan_out"] = summary(latencies, written, subscribers)
    return results
