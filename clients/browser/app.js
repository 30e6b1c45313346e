// A browser app on another origin than kvql (the page is served by
// clients/browser.mjs): Apollo Client with an HttpLink, Automatic Persisted
// Queries and an InMemoryCache without any configuration. It logs in, writes,
// reads, writes again, and shows each step's outcome on the page.
// --- the code the README quotes: browser imports ---
import { ApolloClient, ApolloLink, HttpLink, InMemoryCache, gql } from '@apollo/client';
import { SetContextLink } from '@apollo/client/link/context';
import { PersistedQueryLink } from '@apollo/client/link/persisted-queries';
// --- end ---

const params = new URLSearchParams(location.search);
const KVQL = params.get('api'); // e.g. http://127.0.0.1:8080
const password = params.get('password');

// --- the code the README quotes: Apollo Client in a browser ---
let token = null; // from the login mutation

const sha256 = async (text) => {
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
};

const client = new ApolloClient({
  link: ApolloLink.from([
    new SetContextLink(({ headers }) => ({
      headers: { ...headers, ...(token ? { authorization: `Bearer ${token}` } : {}) },
    })),
    new PersistedQueryLink({ sha256, useGETForHashedQueries: true }),
    new HttpLink({ uri: `${KVQL}/graphql` }),
  ]),
  cache: new InMemoryCache(), // KvObject.id normalises objects: no typePolicies needed
});

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
// --- end ---

const steps = document.getElementById('steps');
function report(name, ok, detail) {
  const li = document.createElement('li');
  li.dataset.step = name;
  li.dataset.ok = String(ok);
  li.textContent = `${name}: ${ok ? 'ok' : 'FAILED'} ${detail ?? ''}`;
  steps.append(li);
}
async function step(name, fn) {
  try {
    const detail = await fn();
    report(name, true, detail);
    return true;
  } catch (error) {
    const extra = error?.errors ? ` ${JSON.stringify(error.errors)}` : '';
    report(name, false, `${error?.name}: ${error?.message}${extra}`);
    return false;
  }
}

const key = `clients/browser/${Date.now()}`;
const value = { greeting: 'hello from the browser', n: 1 };

(async () => {
  const loggedIn = await step('login', async () => {
    // --- the code the README quotes: browser login ---
    const { data } = await client.mutate({ mutation: LOGIN, variables: { username: 'admin', password } });
    token = data.login.accessToken;
    // --- end ---
  });
  if (loggedIn) {
    await step('write', async () => {
      await client.mutate({ mutation: WRITE, variables: { key, data: value } });
    });
    await step('read', async () => {
      const { data } = await client.query({ query: READ, variables: { key }, fetchPolicy: 'network-only' });
      document.getElementById('result').textContent = JSON.stringify(data.object.data);
      return JSON.stringify(data.object.data);
    });
    await step('read again', async () => {
      const { data } = await client.query({ query: READ, variables: { key }, fetchPolicy: 'network-only' });
      return `version ${data.object.version}`;
    });
    await step('cache after write', async () => {
      // --- the code the README quotes: browser cache ---
      await client.mutate({ mutation: WRITE, variables: { key, data: { ...value, n: 2 } } });
      // The mutation's answer updated KvObject:<id> in the cache: no request here.
      const { data } = await client.query({ query: READ, variables: { key } });
      // --- end ---
      if (data.object.data.n !== 2) throw new Error(`the cache still shows ${JSON.stringify(data.object.data)}`);
      return JSON.stringify(data.object.data);
    });
  }
  document.body.dataset.status = 'done';
})();
