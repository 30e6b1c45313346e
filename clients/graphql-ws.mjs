// graphql-ws 6 (the graphql-transport-ws protocol) against kvql's
// /graphql/ws: a subscription receives a write made over HTTP; a dropped
// connection is retried and the subscription carries on; an invalid token is
// closed with 4403, retried only as far as the client allows, and a client
// that logs in again on 4403 recovers; an anonymous socket can log in.
import net from 'node:net';
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';
import { ADMIN_PASSWORD, BASE, WS_URL, equal, login, ok, runChecks, uniqueKey, writeUntil } from './lib.mjs';

const EVENTS = `subscription Events($key: String!) {
  objectEvents(key: $key) { kind key version object { data } }
}`;

/** Subscribes; resolves with the first event (or rejects with the error). */
function firstEvent(client, key) {
  let dispose;
  const received = new Promise((resolve, reject) => {
    dispose = client.subscribe(
      { query: EVENTS, variables: { key } },
      {
        next: (result) => (result.errors ? reject(result.errors) : resolve(result.data.objectEvents)),
        error: reject,
        complete: () => reject(new Error('subscription completed without an event')),
      },
    );
  });
  return { received, dispose: () => dispose() };
}

function describeClose(e) {
  return e && typeof e === 'object' && 'code' in e ? `close ${e.code} ${e.reason ?? ''}` : JSON.stringify(e);
}

/** A TCP proxy in front of kvql whose connections can be cut, to show reconnection. */
async function startProxy() {
  const target = new URL(BASE);
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}/graphql/ws`,
    cutAll: () => sockets.forEach((s) => s.destroy()),
    close: () => {
      sockets.forEach((s) => s.destroy());
      server.close();
    },
  };
}

let token;

await runChecks('graphql-ws', [
  ['subscribe to objectEvents(key) and receive a write made over HTTP', async () => {
    token = await login();
    const key = uniqueKey('ws-event');
    // --- the code the README quotes: graphql-ws client ---
    const client = createClient({
      url: WS_URL, // ws://HOST/graphql/ws
      webSocketImpl: WebSocket, // from the `ws` package in Node; browsers have their own
      connectionParams: { Authorization: `Bearer ${token}` },
    });
    const events = client.iterate({
      query: 'subscription ($key: String!) { objectEvents(key: $key) { kind key version object { data } } }',
      variables: { key },
    });
    // for await (const { data } of events) console.log(data.objectEvents);
    // --- end ---
    const received = events.next().then(({ value, done }) => {
      if (done) throw new Error('subscription ended without an event');
      if (value.errors) throw new Error(JSON.stringify(value.errors));
      return value.data.objectEvents;
    });
    try {
      const event = await writeUntil(received, token, key);
      equal(event.kind, 'PUT', 'event kind');
      equal(event.key, key, 'event key');
      ok(Number.isInteger(event.object?.data?.n), `event value should be {n: <int>}: ${JSON.stringify(event)}`);
    } finally {
      await events.return?.();
      await client.dispose();
    }
  }],

  ['a dropped connection is retried (retryAttempts, shouldRetry) and the subscription receives events again', async () => {
    ok(token, 'no token (first check failed)');
    const proxy = await startProxy();
    const connected = [];
    const closed = [];
    const client = createClient({
      url: proxy.url,
      webSocketImpl: WebSocket,
      connectionParams: { Authorization: `Bearer ${token}` },
      retryAttempts: 3,
      retryWait: (retries) => new Promise((resolve) => setTimeout(resolve, 100 * 2 ** retries)),
      shouldRetry: (e) => e?.code !== 4403,
      on: { connected: () => connected.push(Date.now()), closed: (e) => closed.push(e?.code) },
    });
    const key = uniqueKey('ws-retry');
    let events = [];
    let signal;
    const nextEvent = () => new Promise((resolve) => (signal = resolve));
    let waiting = nextEvent();
    const dispose = client.subscribe(
      { query: EVENTS, variables: { key } },
      {
        next: (r) => {
          events.push(r);
          signal(r);
        },
        error: (e) => signal(Promise.reject(new Error(`subscription failed: ${describeClose(e)}`))),
        complete: () => {},
      },
    );
    try {
      await writeUntil(waiting, token, key);
      equal(connected.length, 1, 'connections before the cut');
      waiting = nextEvent();
      events = [];
      proxy.cutAll();
      const event = await writeUntil(waiting, token, key);
      ok(!event.errors, `event after reconnecting has errors: ${JSON.stringify(event.errors)}`);
      equal(event.data.objectEvents.key, key, 'key of the event after reconnecting');
      equal(connected.length, 2, 'connections (the first and the retried one)');
      ok(closed.length >= 1 && closed[0] !== 4403, `the cut should close abnormally, closes: ${JSON.stringify(closed)}`);
    } finally {
      dispose();
      await client.dispose();
      proxy.close();
    }
  }],

  ['an invalid token is closed with 4403 and, with shouldRetry refusing 4403, not retried', async () => {
    let opened = 0;
    const client = createClient({
      url: WS_URL,
      webSocketImpl: WebSocket,
      connectionParams: { Authorization: 'Bearer not-a-valid-token' },
      retryAttempts: 5,
      shouldRetry: (e) => e?.code !== 4403,
      on: { opened: () => (opened += 1) },
    });
    const sub = firstEvent(client, uniqueKey('ws-forbidden'));
    const outcome = await sub.received.then(
      (event) => ({ event }),
      (error) => ({ error }),
    );
    await client.dispose();
    ok(outcome.error, `expected the socket to be refused, got an event ${JSON.stringify(outcome.event)}`);
    equal(outcome.error?.code, 4403, `close code (got ${describeClose(outcome.error)})`);
    equal(opened, 1, 'sockets opened');
  }],

  ['an invalid token with the default shouldRetry stops after retryAttempts', async () => {
    let opened = 0;
    const codes = [];
    const client = createClient({
      url: WS_URL,
      webSocketImpl: WebSocket,
      connectionParams: { Authorization: 'Bearer not-a-valid-token' },
      retryAttempts: 2,
      retryWait: () => new Promise((resolve) => setTimeout(resolve, 50)),
      on: { opened: () => (opened += 1), closed: (e) => codes.push(e?.code) },
    });
    const outcome = await firstEvent(client, uniqueKey('ws-forbidden-retries')).received.then(
      (event) => ({ event }),
      (error) => ({ error }),
    );
    await client.dispose();
    ok(outcome.error, `expected the socket to be refused, got an event ${JSON.stringify(outcome.event)}`);
    equal(outcome.error?.code, 4403, `final close code (got ${describeClose(outcome.error)})`);
    equal(opened, 3, 'sockets opened (one plus two retries)');
    equal(codes, [4403, 4403, 4403], 'close codes');
  }],

  ['a client that logs in again on 4403 recovers from a stale token', async () => {
    const savedToken = 'a-stale-or-expired-token';
    // --- the code the README quotes: re-login on 4403 ---
    let currentToken = savedToken; // e.g. kept from an earlier session; may have expired
    const client = createClient({
      url: WS_URL,
      webSocketImpl: WebSocket,
      // Called on every (re)connection: log in when there is no token.
      connectionParams: async () => {
        currentToken ??= await login('admin', ADMIN_PASSWORD);
        return { Authorization: `Bearer ${currentToken}` };
      },
      on: {
        closed: (event) => {
          if (event?.code === 4403) currentToken = null; // refused: log in again
        },
      },
      retryAttempts: 5, // then the subscription's error callback gets the last CloseEvent
      shouldRetry: () => true, // the default retries only close events, 4403 among them
    });
    // --- end ---
    const key = uniqueKey('ws-relogin');
    const sub = firstEvent(client, key);
    try {
      const writer = await login();
      const event = await writeUntil(sub.received, writer, key);
      equal(event.key, key, 'event key after logging in again');
      ok(currentToken && currentToken !== savedToken, 'the client should hold a fresh token');
    } finally {
      sub.dispose();
      await client.dispose();
    }
  }],

  ['an anonymous socket can log in (login mutation) and gets UNAUTHENTICATED for reads', async () => {
    const client = createClient({ url: WS_URL, webSocketImpl: WebSocket });
    try {
      const results = [];
      for await (const result of client.iterate({
        query: 'mutation ($p: String!) { login(username: "admin", password: $p) { accessToken tokenType } }',
        variables: { p: ADMIN_PASSWORD },
      })) results.push(result);
      equal(results.length, 1, 'results of login');
      ok(!results[0].errors, `login over the socket failed: ${JSON.stringify(results[0].errors)}`);
      equal(results[0].data.login.tokenType, 'Bearer', 'tokenType');
      ok(results[0].data.login.accessToken.length > 20, 'accessToken');

      let outcome;
      try {
        for await (const result of client.iterate({ query: '{ me { username } }' })) outcome = result;
      } catch (errors) {
        outcome = { errors };
      }
      const errors = Array.isArray(outcome?.errors) ? outcome.errors : [];
      equal(errors[0]?.extensions?.code, 'UNAUTHENTICATED', `code of me without a token (got ${JSON.stringify(outcome)})`);
    } finally {
      await client.dispose();
    }
  }],
]);
