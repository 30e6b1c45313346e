// Drives Debian's Chromium through kvql's two browser pages as a person
// would, and fails if either page loads anything from another origin.
//
//   KVQL_URL=http://127.0.0.1:PORT KVQL_TOKEN=... KVQL_KEY=... node test.mjs
//
// Run by .ci/browser.sh, which starts kvql, logs in and creates KVQL_KEY.
import { chromium } from 'playwright-core';

const base = new URL(process.env.KVQL_URL);
const token = process.env.KVQL_TOKEN;
const key = process.env.KVQL_KEY;
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const timeout = 30_000;

const foreign = [];
const failures = [];
const authorized = [];

function step(message) {
  console.log(`browser: ${message}`);
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ['--no-sandbox'],
});

async function openPage(path) {
  const page = await browser.newPage();
  page.setDefaultTimeout(timeout);
  page.on('request', (request) => {
    const url = new URL(request.url());
    if (url.protocol === 'data:' || url.protocol === 'blob:') return;
    if (url.origin !== base.origin) foreign.push(`${path}: ${request.method()} ${request.url()}`);
    if ((request.headers().authorization || '') === `Bearer ${token}`) {
      authorized.push(`${request.method()} ${url.pathname}`);
    }
  });
  page.on('websocket', (ws) => {
    const url = new URL(ws.url());
    if (url.host !== base.host) foreign.push(`${path}: WebSocket ${ws.url()}`);
  });
  page.on('requestfailed', (request) => {
    failures.push(`${path}: ${request.url()} failed: ${request.failure()?.errorText}`);
  });
  page.on('pageerror', (error) => failures.push(`${path}: page error: ${error.message}`));
  await page.goto(new URL(path, base).toString());
  return page;
}

/** Replaces the text of the CodeMirror editor inside `container` by typing. */
async function typeInto(page, container, text) {
  const editor = page.locator(`${container} .CodeMirror`).first();
  await editor.click();
  await page.keyboard.press('ControlOrMeta+A');
  await page.keyboard.press('Delete');
  await page.keyboard.insertText(text);
  await page.waitForFunction(([el, t]) => el.CodeMirror.getValue() === t,
    [await editor.elementHandle(), text]);
}

/**
 * Types a document into the query editor and waits until GraphiQL has taken
 * it in: it saves the tab's query a moment after each change, and the run
 * button runs what it saved.
 */
async function typeQuery(page, text) {
  await typeInto(page, '.graphiql-query-editor', text);
  await page.waitForFunction((t) => {
    const state = JSON.parse(localStorage.getItem('graphiql:tabState') || '{}');
    return ((state.tabs || [])[state.activeTabIndex || 0] || {}).query === t;
  }, text);
}

async function responseText(page) {
  return page.locator('.graphiql-response').innerText();
}

async function graphiql() {
  step('GraphiQL: open /graphql');
  const page = await openPage('/graphql');
  await page.locator('.graphiql-query-editor .CodeMirror').waitFor();

  step('GraphiQL: the token goes into the Headers tab');
  const headersTab = page.getByRole('button', { name: 'Headers', exact: true });
  await headersTab.click();
  await typeInto(page, '.graphiql-editor-tool .graphiql-editor:not(.hidden)',
    JSON.stringify({ Authorization: `Bearer ${token}` }));

  step('GraphiQL: run `me`');
  await typeQuery(page, 'query { me { username tenant } }');
  await page.locator('.graphiql-execute-button').click();
  await page.waitForFunction(() => {
    const text = document.querySelector('.graphiql-response')?.innerText || '';
    return text.includes('"username"') && text.includes('"tenant"');
  });
  const me = await responseText(page);
  if (!me.includes('"admin"') || !me.includes('"default"')) {
    throw new Error(`GraphiQL's answer to me is not admin of default: ${me}`);
  }
  if (!authorized.includes('POST /graphql')) {
    throw new Error('GraphiQL did not send the Headers tab token with its POST');
  }

  step('GraphiQL: the documentation explorer shows the schema');
  await page.getByRole('button', { name: /Documentation Explorer/ }).click();
  const explorer = page.locator('.graphiql-doc-explorer');
  await explorer.getByText('Mutation', { exact: true }).click();
  await explorer.getByText('login', { exact: true }).first().waitFor();

  step('GraphiQL: a subscription over /graphql/ws sees a write');
  const sentOnSocket = [];
  page.on('websocket', (ws) => ws.on('framesent', (f) => sentOnSocket.push(String(f.payload))));
  const subscribed = new Promise((resolve) => {
    page.on('websocket', (ws) => ws.on('framesent', (f) => {
      if (String(f.payload).includes('"subscribe"')) resolve();
    }));
  });
  await typeQuery(page,
    'subscription { objectEvents(prefix: "browser/") { kind key version } }');
  await page.locator('.graphiql-execute-button').click();
  await subscribed;
  const watched = `browser/${Date.now()}`;
  // Written until the subscriber sees one: the subscription starts on the
  // server a moment after the client sent it.
  let seen = false;
  for (let i = 0; i < 100 && !seen; i++) {
    const put = await fetch(new URL(`/api/object/${encodeURIComponent(watched)}`, base), {
      method: 'PUT',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ data: { n: i } }),
    });
    if (!put.ok) throw new Error(`PUT ${watched}: ${put.status} ${await put.text()}`);
    seen = await page.waitForFunction(
      (k) => (document.querySelector('.graphiql-response')?.innerText || '').includes(k),
      watched, { timeout: 300 }).then(() => true, () => false);
  }
  if (!seen) throw new Error(`the subscription never showed ${watched}: ${await responseText(page)}`);
  const init = sentOnSocket.find((m) => m.includes('connection_init'));
  if (!init || !init.includes(token)) {
    throw new Error(`connection_init did not carry the token: ${init}`);
  }
  await page.close();
}

async function swagger() {
  step('Swagger UI: open /docs');
  const page = await openPage('/docs');
  await page.locator('.btn.authorize').first().waitFor();

  step('Swagger UI: authorise with the token');
  await page.locator('.btn.authorize').first().click();
  const modal = page.locator('.modal-ux');
  await modal.locator('input').first().fill(token);
  await modal.locator('button.authorize').click();
  await modal.locator('button.btn-done').click();

  step(`Swagger UI: GET /api/object/{key} for ${key}`);
  const op = page.locator('.opblock-get', {
    has: page.locator('.opblock-summary-path[data-path="/api/object/{key}"]'),
  });
  await op.locator('.opblock-summary').first().click();
  await op.locator('.try-out__btn').click();
  await op.locator('input[placeholder="key"]').fill(key);
  await op.locator('button.execute').click();
  const status = op.locator('.live-responses-table .response .response-col_status');
  await status.first().waitFor();
  const code = (await status.first().innerText()).trim();
  const body = await op.locator('.live-responses-table').innerText();
  if (code !== '200' || !body.includes(key)) {
    throw new Error(`Swagger UI's GET answered ${code}: ${body}`);
  }
  if (!authorized.some((r) => r.startsWith('GET /api/object/'))) {
    throw new Error('Swagger UI did not send the authorised token');
  }
  await page.close();
}

try {
  await graphiql();
  await swagger();
} catch (error) {
  failures.push(String(error?.stack || error));
} finally {
  await browser.close();
}

for (const request of foreign) failures.push(`request to another origin: ${request}`);
if (failures.length > 0) {
  for (const failure of failures) console.error(`browser: FAILED: ${failure}`);
  process.exit(1);
}
step('both pages work and every request stayed on ' + base.origin);
