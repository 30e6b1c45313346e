// The legacy `graphql-ws` protocol of subscriptions-transport-ws 0.11 (still
// used by older Apollo apps) against kvql's /graphql/ws: subscribe and receive
// one event made by a write over HTTP.
import { SubscriptionClient } from 'subscriptions-transport-ws';
import WebSocket from 'ws';
import { WS_URL, equal, login, ok, runChecks, uniqueKey, writeUntil } from './lib.mjs';

await runChecks('legacy-ws', [
  ['subscriptions-transport-ws subscribes to objectEvents(key) and receives a write', async () => {
    const token = await login();
    const key = uniqueKey('legacy');
    const client = new SubscriptionClient(
      WS_URL,
      { connectionParams: { Authorization: `Bearer ${token}` }, reconnect: false, lazy: true },
      WebSocket,
    );
    const errors = [];
    client.onError((e) => errors.push(e?.message ?? String(e)));
    let subscription;
    const received = new Promise((resolve, reject) => {
      subscription = client
        .request({
          query: 'subscription ($key: String!) { objectEvents(key: $key) { kind key object { data } } }',
          variables: { key },
        })
        .subscribe({
          next: (result) => (result.errors ? reject(new Error(JSON.stringify(result.errors))) : resolve(result.data.objectEvents)),
          error: (e) => reject(new Error(`subscription error: ${JSON.stringify(e)}`)),
          complete: () => reject(new Error('subscription completed without an event')),
        });
    });
    try {
      const event = await writeUntil(received, token, key);
      equal(event.kind, 'PUT', 'event kind');
      equal(event.key, key, 'event key');
      ok(Number.isInteger(event.object?.data?.n), `event value should be {n: <int>}: ${JSON.stringify(event)}`);
      equal(errors, [], 'socket errors');
    } finally {
      subscription?.unsubscribe();
      client.close();
    }
  }],
]);
