// Shared helpers of the client programs: where kvql is, named checks that
// report every failure (with the HTTP exchanges that led to it), a recording
// fetch, and logging in.
import { inspect } from 'node:util';

export const BASE = (process.env.KVQL_URL ?? 'http://127.0.0.1:8080').replace(/\/$/, '');
export const GRAPHQL_URL = `${BASE}/graphql`;
export const WS_URL = `${BASE.replace(/^http/, 'ws')}/graphql/ws`;
export const ADMIN_PASSWORD = process.env.KVQL_ADMIN_PASSWORD ?? '';
const CHECK_TIMEOUT_MS = Number(process.env.KVQL_CHECK_TIMEOUT_MS ?? 20000);

/** A unique key per run and purpose, so programs never see each other's writes. */
export function uniqueKey(purpose) {
  return `clients/${purpose}/${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
}

export class CheckFailed extends Error {}

export function ok(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

export function equal(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new CheckFailed(`${what}: expected ${e}, got ${a}`);
}

// ---- HTTP exchanges, recorded so that a failing check can show them ----

const exchanges = [];

function truncate(text, max = 1500) {
  if (text == null) return text;
  return text.length > max ? `${text.slice(0, max)}... (${text.length} chars)` : text;
}

function headersObject(headers) {
  const out = {};
  new Headers(headers ?? {}).forEach((v, k) => {
    out[k] = k === 'authorization' ? `${v.slice(0, 16)}...` : v;
  });
  return out;
}

/** fetch that records each request and response (and counts them). */
export function recordingFetch(counter = { count: 0, requests: [] }) {
  const wrapped = async (input, init = {}) => {
    const url = typeof input === 'string' ? input : input.url;
    const method = init.method ?? 'GET';
    const entry = {
      method,
      url: decodeURIComponent(url),
      requestHeaders: headersObject(init.headers),
      requestBody: typeof init.body === 'string' ? truncate(init.body) : init.body,
    };
    counter.count += 1;
    counter.requests.push(entry);
    exchanges.push(entry);
    const response = await fetch(input, init);
    const text = await response.clone().text();
    entry.status = response.status;
    entry.responseHeaders = {
      'content-type': response.headers.get('content-type'),
      allow: response.headers.get('allow') ?? undefined,
    };
    entry.responseBody = truncate(text);
    return response;
  };
  wrapped.counter = counter;
  return wrapped;
}

function printExchanges(list) {
  for (const e of list.slice(-4)) {
    console.log(`      > ${e.method} ${e.url}`);
    console.log(`      > headers ${JSON.stringify(e.requestHeaders)}`);
    if (e.requestBody !== undefined) console.log(`      > body ${e.requestBody}`);
    console.log(`      < ${e.status ?? '(no response)'} ${JSON.stringify(e.responseHeaders ?? {})}`);
    if (e.responseBody !== undefined) console.log(`      < body ${e.responseBody}`);
  }
}

// ---- named checks ----

function describe(error) {
  if (error instanceof CheckFailed) return error.message;
  const extra = error?.errors ? ` errors=${JSON.stringify(error.errors)}` : '';
  const status = error?.statusCode ? ` status=${error.statusCode} body=${truncate(error.bodyText, 500)}` : '';
  return `${error?.name ?? 'Error'}: ${error?.message ?? inspect(error)}${extra}${status}`;
}

/**
 * Runs each [title, async fn] in order, each within a time limit; prints
 * "ok"/"FAIL" lines, the failures' HTTP exchanges, and "N passed, N failed";
 * sets the exit code. A failing check does not stop the others.
 */
export async function runChecks(program, checks) {
  let passed = 0;
  let failed = 0;
  console.log(`# ${program} against ${BASE}`);
  for (const [title, fn] of checks) {
    exchanges.length = 0;
    let timer;
    const started = Date.now();
    try {
      await Promise.race([
        fn(),
        new Promise((_, reject) => {
          timer = setTimeout(
            () => reject(new CheckFailed(`timed out after ${CHECK_TIMEOUT_MS} ms`)),
            CHECK_TIMEOUT_MS,
          );
        }),
      ]);
      passed += 1;
      console.log(`ok   - ${title} (${Date.now() - started} ms)`);
    } catch (error) {
      failed += 1;
      console.log(`FAIL - ${title} (${Date.now() - started} ms)\n      ${describe(error).replace(/\n/g, '\n      ')}`);
      if (exchanges.length) {
        console.log('      last HTTP exchanges:');
        printExchanges(exchanges);
      }
    } finally {
      clearTimeout(timer);
    }
  }
  console.log(`${program}: ${passed} passed, ${failed} failed`);
  process.exitCode = failed ? 1 : 0;
  return failed;
}

// ---- kvql calls without a client library ----

/** POST /graphql with plain fetch; returns the parsed JSON body. */
export async function graphql(query, variables, token) {
  const response = await recordingFetch()(GRAPHQL_URL, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      accept: 'application/graphql-response+json, application/json',
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    },
    body: JSON.stringify({ query, variables }),
  });
  return response.json();
}

export async function login(username = 'admin', password = ADMIN_PASSWORD) {
  const body = await graphql(
    'mutation Login($u: String!, $p: String!) { login(username: $u, password: $p) { accessToken } }',
    { u: username, p: password },
  );
  ok(body?.data?.login?.accessToken, `login failed: ${JSON.stringify(body)}`);
  return body.data.login.accessToken;
}

/** Writes a value with plain fetch (for programs whose client only subscribes). */
export async function put(token, key, data) {
  const body = await graphql(
    'mutation Put($input: PutObjectInput!) { putObject(input: $input) { object { key version } } }',
    { input: { key, data } },
    token,
  );
  ok(body?.data?.putObject, `putObject failed: ${JSON.stringify(body)}`);
  return body.data.putObject.object;
}

/**
 * Waits for the first value of `received` (a promise) while writing
 * `{n: 1}`, `{n: 2}`, ... to `key` every `everyMs`: a subscription is
 * active on the server some time after the client sent it, and this
 * waits for exactly that instead of sleeping a guessed time.
 */
export async function writeUntil(received, token, key, everyMs = 150) {
  let done = false;
  let n = 0;
  const writer = (async () => {
    while (!done) {
      n += 1;
      await put(token, key, { n });
      await Promise.race([received, new Promise((r) => setTimeout(r, everyMs))]);
    }
  })();
  try {
    return await received;
  } finally {
    done = true;
    await writer.catch(() => {});
  }
}
