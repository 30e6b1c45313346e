// Apollo Client in a real browser on another origin (CORS): bundles
// browser/app.js with esbuild, serves it from a static server on another
// port, opens it in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; no browser is downloaded) and checks what the page shows
// and which requests it made.
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { chromium } from 'playwright-core';
import { ADMIN_PASSWORD, BASE, equal, ok, runChecks } from './lib.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.KVQL_CHROMIUM ?? '/usr/bin/chromium';

const out = await mkdtemp(path.join(os.tmpdir(), 'kvql-browser-'));
let server;
let browser;
const steps = {};
const apiRequests = []; // the page's requests to kvql, with their responses
const consoleLines = [];
let pageOrigin;

function stepCheck(name) {
  return async () => {
    ok(steps[name], `the page reported no "${name}" step (steps: ${JSON.stringify(steps)})`);
    ok(steps[name].ok === 'true', `step "${name}": ${steps[name].text}`);
  };
}

function dumpRequests() {
  return apiRequests
    .map((r) => `  ${r.method} ${r.url} -> ${r.status ?? r.failure} ${r.acao ? `ACAO=${r.acao}` : 'no ACAO'}${r.body ? ` ${r.body}` : ''}`)
    .join('\n');
}

try {
  await runChecks('browser', [
    ['bundle the app with esbuild, serve it from another origin and run it in Chromium', async () => {
      await build({
        entryPoints: [path.join(here, 'browser/app.js')],
        bundle: true,
        format: 'iife',
        platform: 'browser',
        outfile: path.join(out, 'app.js'),
        define: { 'process.env.NODE_ENV': '"production"' },
        logLevel: 'error',
      });
      const files = {
        '/index.html': ['text/html', await readFile(path.join(here, 'browser/index.html'))],
        '/app.js': ['text/javascript', await readFile(path.join(out, 'app.js'))],
      };
      server = http.createServer((req, res) => {
        const file = files[new URL(req.url, 'http://x').pathname];
        if (!file) return res.writeHead(req.url === '/favicon.ico' ? 204 : 404).end();
        res.writeHead(200, { 'content-type': file[0] }).end(file[1]);
      });
      await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
      pageOrigin = `http://127.0.0.1:${server.address().port}`;
      ok(pageOrigin !== new URL(BASE).origin, 'the page must come from another origin than kvql');

      browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
      const page = await browser.newPage();
      page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
      page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
      page.on('request', (r) => {
        if (r.url().startsWith(BASE)) {
          const body = r.postData()?.replace(/"password":"[^"]*"/, '"password":"..."').slice(0, 300);
          apiRequests.push({ method: r.method(), url: decodeURIComponent(r.url()), request: r, body });
        }
      });
      page.on('requestfinished', async (r) => {
        const entry = apiRequests.find((e) => e.request === r);
        const response = await r.response();
        if (entry && response) {
          entry.status = response.status();
          entry.acao = response.headers()['access-control-allow-origin'];
        }
      });
      page.on('requestfailed', (r) => {
        const entry = apiRequests.find((e) => e.request === r);
        if (entry) entry.failure = r.failure()?.errorText;
      });
      const url = `${pageOrigin}/index.html?api=${encodeURIComponent(BASE)}&password=${encodeURIComponent(ADMIN_PASSWORD)}`;
      await page.goto(url);
      await page.waitForSelector('body[data-status="done"]', { timeout: 15000 });
      for (const li of await page.locator('#steps li').all()) {
        steps[await li.getAttribute('data-step')] = { ok: await li.getAttribute('data-ok'), text: await li.textContent() };
      }
      steps.shown = await page.locator('#result').textContent();
      console.log(`      page steps: ${Object.entries(steps).filter(([k]) => k !== 'shown').map(([k, v]) => `${k}=${v.ok === 'true' ? 'ok' : 'FAILED'}`).join(', ')}`);
    }],

    ['the page logs in across origins; every answer, errors included, carries Access-Control-Allow-Origin', async () => {
      await stepCheck('login')();
      // The last Login request is the one that carries the query (the first
      // is APQ's hash-only miss, 400 PersistedQueryNotFound).
      const login = apiRequests.filter((r) => r.method === 'POST' && /Login/.test(r.body ?? '')).at(-1);
      ok(login?.status === 200, `login request: ${JSON.stringify(login && { status: login.status, failure: login.failure })}`);
      const blind = apiRequests.filter((r) => !(r.acao === '*' || r.acao === pageOrigin));
      ok(!blind.length, `answers the page could not read (no Access-Control-Allow-Origin for ${pageOrigin}):\n${blind.map((r) => `${r.method} ${r.url} -> ${r.status ?? r.failure}`).join('\n')}`);
    }],

    ['the page writes a value (putObject with an Authorization header)', stepCheck('write')],

    ['the page reads the value back and shows it', async () => {
      await stepCheck('read')();
      equal(JSON.parse(steps.shown || 'null'), { greeting: 'hello from the browser', n: 1 }, 'value shown on the page');
    }],

    ['the second read is a hash-only GET (APQ with useGETForHashedQueries) answered 200', async () => {
      await stepCheck('read again')();
      const reads = apiRequests.filter((r) => /Read/.test(r.url) || /"Read"/.test(r.body ?? ''));
      const last = reads.at(-1);
      ok(last?.method === 'GET', `the last read should be a GET, was ${last?.method}`);
      ok(!new URL(last.request.url()).searchParams.has('query'), `the last read sent the query text: ${last.url}`);
      equal(last.status, 200, 'status of the hash-only GET');
    }],

    ['the cache (no typePolicies) shows the value written last without refetching', stepCheck('cache after write')],
  ]);
} finally {
  if (process.exitCode) {
    console.log('the page\'s requests to kvql:\n' + dumpRequests());
    if (consoleLines.length) console.log('browser console:\n  ' + consoleLines.join('\n  '));
  }
  await browser?.close();
  server?.close();
  await rm(out, { recursive: true, force: true });
}
