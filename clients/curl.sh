#!/usr/bin/env bash
# The README's curl examples of GraphQL over HTTP, run as they are written
# (between the "README quotes" markers) and checked: login, a query over
# GET, a batched request, a mutation over GET (405), a non-JSON POST (415)
# and a hash-only persisted query (PersistedQueryNotFound, then a hit).
set -uo pipefail
KVQL="${KVQL_URL:-http://127.0.0.1:8080}"
PASSWORD="${KVQL_ADMIN_PASSWORD:-}"
passed=0
failed=0
echo "# curl against $KVQL"

# check TITLE PYTHON-EXPRESSION: the expression sees `out` (the command's
# output), `status` (its HTTP status, when captured) and `j` (out as JSON).
check() {
    local title="$1" expr="$2"
    if python3 - "$expr" "$out" "${status:-}" <<'PY'; then
import json, sys
expr, out, status = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    j = json.loads(out.split("\r\n\r\n")[-1] if out.startswith("HTTP/") else out)
except ValueError:
    j = None
sys.exit(0 if eval(expr) else 1)
PY
        passed=$((passed + 1)); echo "ok   - $title"
    else
        failed=$((failed + 1)); echo "FAIL - $title"
        echo "      expected: $2"
        echo "      got: ${out:0:600}" | sed '2,$s/^/      /'
    fi
}

out="$(curl -s "$KVQL/graphql" -H 'Content-Type: application/json' \
    -d "{\"query\": \"mutation { login(username: \\\"admin\\\", password: \\\"$PASSWORD\\\") { accessToken } }\"}")"
TOKEN="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["data"]["login"]["accessToken"])' "$out" 2>/dev/null)"
check "login mutation over POST" "j and j['data']['login']['accessToken']"
curl -s -o /dev/null "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d '{"query": "mutation { putObject(input: {key: \"greeting\", data: \"hello\"}) { created } }"}'

out="$(
# --- the code the README quotes: curl GET ---
curl -sG "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" \
  --data-urlencode 'query=query ($key: String!) { object(key: $key) { key data } }' \
  --data-urlencode 'variables={"key": "greeting"}'
# --- end ---
)"
check "GET /graphql?query=&variables= answers JSON (Accept: */*)" \
    "j == {'data': {'object': {'key': 'greeting', 'data': 'hello'}}}"

out="$(
# --- the code the README quotes: curl batch ---
curl -s "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '[{"query": "{ me { username } }"},
       {"query": "query ($k: String!) { object(key: $k) { data } }", "variables": {"k": "greeting"}}]'
# --- end ---
)"
check "a batched request (JSON array) gets an array of results in order" \
    "j == [{'data': {'me': {'username': 'admin'}}}, {'data': {'object': {'data': 'hello'}}}]"

out="$(curl -s -D - -o /dev/null -G "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" \
  --data-urlencode 'query=mutation { deleteObject(key: "greeting") }')"
status="$(printf '%s' "$out" | head -n1 | awk '{print $2}')"
check "a mutation over GET is refused with 405 and Allow: POST" \
    "status == '405' and 'allow: post' in out.lower()"
status=""

out="$(curl -s -o /dev/null -w '%{http_code}' "$KVQL/graphql" -H 'Content-Type: text/plain' -d '{ me { username } }')"
check "a POST whose Content-Type is not JSON gets 415" "out == '415'"

HASH="$(printf '%s' '{ me { username } }' | sha256sum | cut -d' ' -f1)"
out="$(curl -sG "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" \
  --data-urlencode "extensions={\"persistedQuery\":{\"version\":1,\"sha256Hash\":\"$HASH\"}}")"
check "a hash-only GET of an unknown query answers PersistedQueryNotFound / PERSISTED_QUERY_NOT_FOUND" \
    "j and j['errors'][0]['message'] == 'PersistedQueryNotFound' and j['errors'][0]['extensions']['code'] == 'PERSISTED_QUERY_NOT_FOUND'"
out="$(curl -s "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d "{\"query\": \"{ me { username } }\", \"extensions\": {\"persistedQuery\": {\"version\": 1, \"sha256Hash\": \"$HASH\"}}}")"
check "sending the query with its hash registers it" "j == {'data': {'me': {'username': 'admin'}}}"
out="$(curl -sG "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" \
  --data-urlencode "extensions={\"persistedQuery\":{\"version\":1,\"sha256Hash\":\"$HASH\"}}")"
check "then the hash alone runs it over GET" "j == {'data': {'me': {'username': 'admin'}}}"
out="$(curl -s "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d "{\"query\": \"{ me { tenant } }\", \"extensions\": {\"persistedQuery\": {\"version\": 1, \"sha256Hash\": \"$HASH\"}}}")"
check "a query whose hash does not match is refused (errors, no data)" "j and j.get('errors') and not j.get('data')"

# KVQL_GRAPHQL_MAX_BATCH is 5 in .ci/clients.sh: six writes in one batch are refused, none applied.
BATCH="$(python3 -c 'import json; print(json.dumps([{"query": "mutation ($n: JSON) { putObject(input: {key: \"over-the-cap\", data: $n}) { created } }", "variables": {"n": n}} for n in range(6)]))')"
out="$(curl -s -w '\n%{http_code}' "$KVQL/graphql" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d "$BATCH")"
status="${out##*$'\n'}"; out="${out%$'\n'*}"
check "a batch over KVQL_GRAPHQL_MAX_BATCH (5) is refused with 400 and an error" \
    "status == '400' and (isinstance(j, dict) and (j.get('errors') or j.get('error')))"
status=""
out="$(curl -s "$KVQL/api/object/over-the-cap" -H "Authorization: Bearer $TOKEN" -o /dev/null -w '%{http_code}')"
check "and none of its operations ran (the key is absent)" "out == '404'"

echo "curl: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
