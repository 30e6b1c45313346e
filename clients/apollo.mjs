// Apollo Client 4 in Node against kvql: login, writes and reads with a bearer
// token, the normalised cache with no configuration (KvObject.id), Automatic
// Persisted Queries over GET, batching, and error codes.
import { createHash } from 'node:crypto';
import { ApolloClient, ApolloLink, HttpLink, InMemoryCache, gql } from '@apollo/client';
import { BatchHttpLink } from '@apollo/client/link/batch-http';
import { SetContextLink } from '@apollo/client/link/context';
import { PersistedQueryLink } from '@apollo/client/link/persisted-queries';
import { CombinedGraphQLErrors } from '@apollo/client/errors';
import { ADMIN_PASSWORD, GRAPHQL_URL, equal, ok, recordingFetch, runChecks, uniqueKey } from './lib.mjs';

const LOGIN = gql`
  mutation Login($username: String!, $password: String!) {
    login(username: $username, password: $password) { accessToken }
  }
`;
const READ = gql`
  query Read($key: String!) {
    object(key: $key) { id key data version }
  }
`;
const WRITE = gql`
  mutation Write($key: String!, $data: JSON) {
    putObject(input: { key: $key, data: $data }) { object { id key data version } }
  }
`;

// The same documents without `id`, for the checks of other features, so that
// each check fails only for its own feature.
const READ_VALUE = gql`
  query ReadValue($key: String!) {
    object(key: $key) { key data version }
  }
`;
const WRITE_VALUE = gql`
  mutation WriteValue($key: String!, $data: JSON) {
    putObject(input: { key: $key, data: $data }) { object { key data version } }
  }
`;

let token;
const sha256 = (text) => createHash('sha256').update(text).digest('hex');

/** A client whose every request goes through a counting, recording fetch. */
function makeClient(terminal, { withToken = true } = {}) {
  const auth = new SetContextLink(({ headers }) => ({
    headers: { ...headers, ...(withToken && token ? { authorization: `Bearer ${token}` } : {}) },
  }));
  return new ApolloClient({ link: ApolloLink.from([auth, terminal]), cache: new InMemoryCache() });
}

function codeOf(error) {
  ok(CombinedGraphQLErrors.is(error), `expected GraphQL errors, got ${error?.name}: ${error?.message}`);
  return error.errors[0]?.extensions?.code;
}

await runChecks('apollo', [
  ['login mutation returns a bearer token', async () => {
    const client = makeClient(new HttpLink({ uri: GRAPHQL_URL, fetch: recordingFetch() }), { withToken: false });
    const { data } = await client.mutate({
      mutation: LOGIN,
      variables: { username: 'admin', password: ADMIN_PASSWORD },
    });
    ok(typeof data?.login?.accessToken === 'string', `no accessToken in ${JSON.stringify(data)}`);
    token = data.login.accessToken;
  }],

  ['putObject then object(key) reads the value back', async () => {
    ok(token, 'no token (login failed)');
    const client = makeClient(new HttpLink({ uri: GRAPHQL_URL, fetch: recordingFetch() }));
    const key = uniqueKey('apollo-rw');
    const { data: written } = await client.mutate({ mutation: WRITE_VALUE, variables: { key, data: { n: 1 } } });
    equal(written.putObject.object.data, { n: 1 }, 'putObject returned data');
    const { data } = await client.query({ query: READ_VALUE, variables: { key }, fetchPolicy: 'network-only' });
    equal(data.object.key, key, 'object.key');
    equal(data.object.data, { n: 1 }, 'object.data');
    equal(data.object.version, '1', 'object.version');
  }],

  ['InMemoryCache without typePolicies shows the new value after a write, without refetching', async () => {
    ok(token, 'no token (login failed)');
    const fetch = recordingFetch();
    const client = makeClient(new HttpLink({ uri: GRAPHQL_URL, fetch }));
    const key = uniqueKey('apollo-cache');
    await client.mutate({ mutation: WRITE, variables: { key, data: 'old' } });
    const first = await client.query({ query: READ, variables: { key } });
    equal(first.data.object.data, 'old', 'first read');
    ok(typeof first.data.object.id === 'string' && first.data.object.id.length > 0, `KvObject.id missing: ${JSON.stringify(first.data.object)}`);

    const seen = [];
    const watched = client.watchQuery({ query: READ, variables: { key }, fetchPolicy: 'cache-only' });
    const sub = watched.subscribe((result) => seen.push(result.data?.object?.data));
    await client.mutate({ mutation: WRITE, variables: { key, data: 'new' } });
    const requestsAfterWrite = fetch.counter.count;

    const cached = client.readQuery({ query: READ, variables: { key } });
    equal(cached?.object?.data, 'new', 'cache after putObject (readQuery)');
    const again = await client.query({ query: READ, variables: { key }, fetchPolicy: 'cache-first' });
    equal(again.data.object.data, 'new', 'cache-first query after putObject');
    equal(fetch.counter.count, requestsAfterWrite, 'requests made by reading the cache');
    await new Promise((resolve) => setImmediate(resolve)); // let the watcher's notification run
    equal(seen.at(-1), 'new', 'what a watching query shows after putObject');
    sub.unsubscribe();
  }],

  ['Automatic Persisted Queries with GET: the second request of a query sends only the hash', async () => {
    ok(token, 'no token (login failed)');
    const key = uniqueKey('apollo-apq');
    const fetch = recordingFetch();
    const link = new PersistedQueryLink({ sha256, useGETForHashedQueries: true }).concat(
      new HttpLink({ uri: GRAPHQL_URL, fetch }),
    );
    const client = makeClient(link);
    await client.mutate({ mutation: WRITE_VALUE, variables: { key, data: { apq: true } } });

    fetch.counter.requests.length = 0;
    const first = await client.query({ query: READ_VALUE, variables: { key }, fetchPolicy: 'network-only' });
    equal(first.data.object.data, { apq: true }, 'first APQ read');
    const [miss, full, ...extra] = fetch.counter.requests;
    ok(miss && miss.method === 'GET', `first request should be a GET with the hash, was ${miss?.method}`);
    ok(!new URL(miss.url).searchParams.has('query'), `the first GET sent the query: ${miss.url}`);
    ok(/PersistedQueryNotFound/.test(miss.responseBody), `hash-only GET of a new query should answer PersistedQueryNotFound, got ${miss.status} ${miss.responseBody}`);
    ok(full && /"query"/.test(full.requestBody ?? '') && full.status === 200, `the retry should send the query and succeed: ${JSON.stringify(full)}`);
    equal(extra.length, 0, 'requests beyond the hash and the retry');

    fetch.counter.requests.length = 0;
    const second = await client.query({ query: READ_VALUE, variables: { key }, fetchPolicy: 'network-only' });
    equal(second.data.object.data, { apq: true }, 'second APQ read');
    equal(fetch.counter.requests.length, 1, 'requests for the second read');
    const only = fetch.counter.requests[0];
    equal(only.method, 'GET', 'method of the second read');
    const params = new URL(only.url).searchParams;
    ok(!params.has('query'), `the second read sent the query text: ${only.url}`);
    ok(JSON.parse(params.get('extensions') ?? '{}')?.persistedQuery?.sha256Hash, `no persistedQuery hash in ${only.url}`);
    equal(only.status, 200, 'status of the hash-only GET');
  }],

  ['Automatic Persisted Queries for a mutation: hash-only POST on the second call', async () => {
    ok(token, 'no token (login failed)');
    const fetch = recordingFetch();
    const client = makeClient(
      new PersistedQueryLink({ sha256, useGETForHashedQueries: true }).concat(new HttpLink({ uri: GRAPHQL_URL, fetch })),
    );
    const key = uniqueKey('apollo-apq-mutation');
    await client.mutate({ mutation: WRITE_VALUE, variables: { key, data: 1 } });
    fetch.counter.requests.length = 0;
    const { data } = await client.mutate({ mutation: WRITE_VALUE, variables: { key, data: 2 } });
    equal(data.putObject.object.data, 2, 'data written by the hash-only mutation');
    equal(data.putObject.object.version, '2', 'version after the second write');
    equal(fetch.counter.requests.length, 1, 'requests for the second mutation');
    const only = fetch.counter.requests[0];
    equal(only.method, 'POST', 'method of a hashed mutation');
    const body = JSON.parse(only.requestBody);
    ok(!('query' in body), `the second mutation sent the query text: ${only.requestBody}`);
  }],

  ['BatchHttpLink: three queries in one HTTP request, answered in order', async () => {
    ok(token, 'no token (login failed)');
    const keys = [uniqueKey('apollo-batch-a'), uniqueKey('apollo-batch-b'), uniqueKey('apollo-batch-c')];
    const writer = makeClient(new HttpLink({ uri: GRAPHQL_URL, fetch: recordingFetch() }));
    for (const [i, key] of keys.entries()) await writer.mutate({ mutation: WRITE_VALUE, variables: { key, data: { i } } });

    const fetch = recordingFetch();
    // --- the code the README quotes: batching ---
    // Operations started within 20 ms of each other go in one POST, as a JSON
    // array (keep batchMax at most KVQL_GRAPHQL_MAX_BATCH).
    const batchLink = new BatchHttpLink({ uri: GRAPHQL_URL, batchMax: 5, batchInterval: 20, fetch });
    // --- end ---
    const batched = makeClient(batchLink);
    const results = await Promise.all(
      keys.map((key) => batched.query({ query: READ_VALUE, variables: { key }, fetchPolicy: 'network-only' })),
    );
    equal(fetch.counter.requests.length, 1, 'HTTP requests for three batched queries');
    const sent = JSON.parse(fetch.counter.requests[0].requestBody);
    ok(Array.isArray(sent) && sent.length === 3, `the request body should be an array of 3 operations: ${fetch.counter.requests[0].requestBody}`);
    results.forEach(({ data }, i) => {
      equal(data.object.key, keys[i], `key of batched result ${i}`);
      equal(data.object.data, { i }, `data of batched result ${i}`);
    });
  }],

  ['errors carry extensions.code: reading without a token is UNAUTHENTICATED', async () => {
    const client = makeClient(new HttpLink({ uri: GRAPHQL_URL, fetch: recordingFetch() }), { withToken: false });
    const error = await client.query({ query: READ_VALUE, variables: { key: 'x' } }).then(
      (r) => r.error ?? new Error(`expected an error, got ${JSON.stringify(r.data)}`),
      (e) => e,
    );
    equal(codeOf(error), 'UNAUTHENTICATED', 'errors[0].extensions.code');
  }],

  ['errors carry extensions.code: createObject on an existing key is ALREADY_EXISTS', async () => {
    ok(token, 'no token (login failed)');
    const client = makeClient(new HttpLink({ uri: GRAPHQL_URL, fetch: recordingFetch() }));
    const key = uniqueKey('apollo-exists');
    const CREATE = gql`mutation Create($key: String!) { createObject(input: { key: $key, data: 1 }) { key } }`;
    await client.mutate({ mutation: CREATE, variables: { key } });
    const error = await client.mutate({ mutation: CREATE, variables: { key } }).then(
      (r) => r.error ?? new Error(`expected an error, got ${JSON.stringify(r.data)}`),
      (e) => e,
    );
    equal(codeOf(error), 'ALREADY_EXISTS', 'errors[0].extensions.code');
  }],

  ['a validation error reaches Apollo as GraphQL errors with code INVALID_INPUT', async () => {
    ok(token, 'no token (login failed)');
    const client = makeClient(new HttpLink({ uri: GRAPHQL_URL, fetch: recordingFetch() }));
    const BAD = gql`query Bad { object(key: "k") { noSuchField } }`;
    const error = await client.query({ query: BAD }).then(
      (r) => r.error ?? new Error(`expected an error, got ${JSON.stringify(r.data)}`),
      (e) => e,
    );
    equal(codeOf(error), 'INVALID_INPUT', 'errors[0].extensions.code');
  }],
]);
