"""The limiter's Redis client against a real redis-server: a caller that gives up leaves the
connection usable; AUTH and SELECT from the URL; a lost connection is opened again."""

from __future__ import annotations

import asyncio

import pytest

from proxy.resp import Resp, RespConnectionError, RespError
from tests.redis_fixture import RedisServer

# A script that keeps Redis busy for 0.2 s (DEBUG SLEEP is off in Debian's redis-server).
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 200000
return 1
"""


async def test_a_caller_that_gives_up_leaves_the_connection_usable(redis_server) -> None:
    """A reply that comes after its caller's timeout is dropped; the next caller on the same
    connection gets its own reply, not the late one."""
    client = Resp(redis_server.url)
    try:
        await client.call("SET", "x", "1")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await client.call("EVAL", BUSY, 0)
        conn = client._conn
        assert b"1" == await client.call("GET", "x")
        assert conn is client._conn  # the same connection
    finally:
        await client.close()


async def test_auth_and_select_from_the_url(redis_server: RedisServer) -> None:
    """A password and a database number in the URL are sent on connect; a wrong password is
    a connection error, not a reply."""
    admin = Resp(redis_server.url)
    await admin.call("CONFIG", "SET", "requirepass", "s3cret")
    await admin.close()
    host = f"127.0.0.1:{redis_server.port}"
    client = Resp(f"redis://:s3cret@{host}/2")
    wrong = Resp(f"redis://:nope@{host}/0")
    try:
        await client.call("SET", "in-two", "yes")
        for db, value in (("2", b"yes"), ("0", None)):
            other = Resp(f"redis://:s3cret@{host}/{db}")
            assert value == await other.call("GET", "in-two")
            await other.close()
        with pytest.raises(RespConnectionError):
            await wrong.call("PING")
    finally:
        await client.call(
            "CONFIG", "SET", "requirepass", ""
        )  # the fixture stops it unauthenticated
        await client.close()
        await wrong.close()


async def test_a_lost_connection_fails_its_callers_and_is_opened_again(redis_server) -> None:
    """Redis restarted: the waiting call fails at once, the next one connects again."""
    client = Resp(redis_server.url)
    try:
        assert b"PONG" == await client.call("PING")
        redis_server.kill()
        with pytest.raises((RespConnectionError, OSError)):
            await client.call("PING")
        redis_server.start()
        assert b"PONG" == await client.call("PING")
        with pytest.raises(RespError):
            await client.call("NOSUCHCOMMAND")
        assert b"PONG" == await client.call("PING")  # an error reply breaks nothing
    finally:
        await client.close()
