// The README's client snippets are the code the programs run: each region
// between "--- the code the README quotes: NAME ---" and "--- end ---" in a
// program must appear, dedented, verbatim in README.md.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runChecks, CheckFailed } from './lib.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const sources = ['browser/app.js', 'apollo.mjs', 'graphql-ws.mjs', 'gql_client.py', 'curl.sh'];
const readme = (await readFile(path.join(here, '..', 'README.md'), 'utf8')).replace(/\r\n/g, '\n');

function dedent(lines) {
  const indent = Math.min(...lines.filter((l) => l.trim()).map((l) => l.match(/^ */)[0].length));
  return lines.map((l) => l.slice(indent)).join('\n');
}

const checks = [];
for (const source of sources) {
  const lines = (await readFile(path.join(here, source), 'utf8')).split('\n');
  for (let i = 0; i < lines.length; i++) {
    const start = lines[i].match(/(?:\/\/|#) --- the code the README quotes: (.+) ---\s*$/);
    if (!start) continue;
    const end = lines.findIndex((l, j) => j > i && /(?:\/\/|#) --- end ---\s*$/.test(l));
    if (end < 0) throw new Error(`${source}: "${start[1]}" has no end marker`);
    const snippet = dedent(lines.slice(i + 1, end));
    checks.push([`README quotes ${source} "${start[1]}" verbatim`, async () => {
      if (!readme.includes(snippet)) {
        throw new CheckFailed(`README.md lacks this text (copy it into the "Using kvql from a client" section):\n${snippet}`);
      }
    }]);
  }
}
if (!checks.length) throw new Error('no snippets found');
await runChecks('snippets', checks);
