// graphql-http's serverAudits (the GraphQL Foundation's GraphQL-over-HTTP
// conformance suite) against kvql's /graphql. Fails on any audit whose status
// is `error` (a MUST of the spec) or `warn` (a SHOULD); notices are printed.
import { serverAudits } from 'graphql-http';
import { GRAPHQL_URL } from './lib.mjs';

let current = [];
const fetchFn = async (input, init = {}) => {
  const response = await fetch(input, init);
  current.push({
    method: init.method ?? 'GET',
    url: decodeURIComponent(String(input)),
    headers: init.headers,
    body: init.body,
    status: response.status,
    contentType: response.headers.get('content-type'),
    responseBody: (await response.clone().text()).slice(0, 600),
  });
  return response;
};

const counts = { ok: 0, notice: 0, warn: 0, error: 0 };
const failures = [];
console.log(`# graphql-http serverAudits against ${GRAPHQL_URL}`);
for (const audit of serverAudits({ url: GRAPHQL_URL, fetchFn })) {
  current = [];
  let result;
  try {
    result = await audit.fn();
  } catch (error) {
    result = { id: audit.id, name: audit.name, status: 'error', reason: `threw: ${error?.message ?? error}` };
  }
  counts[result.status] += 1;
  const line = `${result.status.padEnd(6)} ${result.id} ${result.name}`;
  console.log(result.status === 'ok' ? line : `${line}\n         reason: ${result.reason}`);
  if (result.status !== 'ok') {
    for (const e of current) {
      console.log(`         > ${e.method} ${e.url} headers=${JSON.stringify(e.headers ?? {})}${e.body ? ` body=${String(e.body).slice(0, 300)}` : ''}`);
      console.log(`         < ${e.status} ${e.contentType} ${e.responseBody}`);
    }
  }
  if (result.status === 'warn' || result.status === 'error') failures.push(result);
}

console.log(
  `\ngraphql-http audit: ${counts.ok} ok, ${counts.notice} notice, ${counts.warn} warn, ${counts.error} error`,
);
if (failures.length) {
  console.log('failing audits (warn or error):');
  for (const f of failures) console.log(`  ${f.status} ${f.id} ${f.name}: ${f.reason}`);
}
console.log(`audit: ${counts.ok + counts.notice} passed, ${failures.length} failed`);
process.exitCode = failures.length ? 1 : 0;
