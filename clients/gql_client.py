"""Python gql 4 against kvql: log in, write and read over HTTP with
AIOHTTPTransport, and receive a subscription event over WebsocketsTransport
(graphql-transport-ws subprotocol). Run by .ci/clients.sh."""
import asyncio
import os
import sys
import time
import traceback

from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport

BASE = os.environ.get("KVQL_URL", "http://127.0.0.1:8080").rstrip("/")
PASSWORD = os.environ.get("KVQL_ADMIN_PASSWORD", "")
HTTP_URL = f"{BASE}/graphql"
WS_URL = f"{BASE.replace('http', 'ws', 1)}/graphql/ws"


class CheckFailed(Exception):
    pass


def equal(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")


def unique_key(purpose):
    return f"clients/{purpose}/{os.getpid()}-{time.time_ns()}"


# --- the code the README quotes: Python gql ---
async def log_in(username, password):
    transport = AIOHTTPTransport(url=HTTP_URL)
    async with Client(transport=transport) as session:
        query = gql("mutation ($u: String!, $p: String!) { login(username: $u, password: $p) { accessToken } }")
        query.variable_values = {"u": username, "p": password}
        result = await session.execute(query)
        return result["login"]["accessToken"]


async def write_and_read(token, key):
    transport = AIOHTTPTransport(url=HTTP_URL, headers={"Authorization": f"Bearer {token}"})
    async with Client(transport=transport) as session:
        put = gql("mutation ($key: String!, $data: JSON) { putObject(input: {key: $key, data: $data}) { object { version } } }")
        put.variable_values = {"key": key, "data": {"from": "python"}}
        await session.execute(put)
        read = gql("query ($key: String!) { object(key: $key) { key data version } }")
        read.variable_values = {"key": key}
        return (await session.execute(read))["object"]


async def first_event(token, key):
    transport = WebsocketsTransport(
        url=WS_URL,
        init_payload={"Authorization": f"Bearer {token}"},
        subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],  # graphql-transport-ws
    )
    async with Client(transport=transport) as session:
        events = gql("subscription ($key: String!) { objectEvents(key: $key) { kind key object { data } } }")
        events.variable_values = {"key": key}
        async for result in session.subscribe(events):
            return result["objectEvents"]
# --- end ---


async def check_login_write_read(state):
    state["token"] = await log_in("admin", PASSWORD)
    key = unique_key("python-rw")
    obj = await write_and_read(state["token"], key)
    equal(obj["key"], key, "key read back")
    equal(obj["data"], {"from": "python"}, "data read back")
    equal(obj["version"], "1", "version")


async def check_error_code(state):
    transport = AIOHTTPTransport(url=HTTP_URL)
    async with Client(transport=transport) as session:
        try:
            await session.execute(gql('{ object(key: "x") { key } }'))
        except TransportQueryError as error:
            equal((error.errors or [{}])[0].get("extensions", {}).get("code"), "UNAUTHENTICATED", "errors[0].extensions.code")
            return
    raise CheckFailed("reading without a token should fail")


async def check_subscription(state):
    token = state.get("token")
    if not token:
        raise CheckFailed("no token (login failed)")
    key = unique_key("python-ws")
    task = asyncio.ensure_future(first_event(token, key))
    transport = AIOHTTPTransport(url=HTTP_URL, headers={"Authorization": f"Bearer {token}"})
    async with Client(transport=transport) as session:
        put = gql("mutation ($key: String!, $n: JSON) { putObject(input: {key: $key, data: $n}) { created } }")
        n = 0
        # The subscription is live on the server some time after it is sent:
        # write until the event arrives instead of sleeping a guessed time.
        while not task.done():
            n += 1
            put.variable_values = {"key": key, "n": n}
            await session.execute(put)
            await asyncio.wait([task], timeout=0.15)
    event = task.result()
    equal(event["kind"], "PUT", "event kind")
    equal(event["key"], key, "event key")
    if not isinstance(event["object"]["data"], int):
        raise CheckFailed(f"event data should be an int: {event!r}")


async def main():
    print(f"# gql (Python) against {BASE}")
    state = {}
    passed = failed = 0
    checks = [
        ("log in, putObject and read it back with AIOHTTPTransport", check_login_write_read),
        ("reading without a token raises TransportQueryError with UNAUTHENTICATED", check_error_code),
        ("WebsocketsTransport (graphql-transport-ws) receives an objectEvents event", check_subscription),
    ]
    for title, check in checks:
        try:
            await asyncio.wait_for(check(state), timeout=20)
            passed += 1
            print(f"ok   - {title}")
        except Exception as error:  # noqa: BLE001 - report every failure
            failed += 1
            detail = str(error) if isinstance(error, CheckFailed) else "".join(traceback.format_exception(error)).strip()
            print(f"FAIL - {title}\n      " + detail.replace("\n", "\n      "))
    print(f"gql: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
