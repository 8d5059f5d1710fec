"""`inference-proxy keys ...` as an operator runs it, and gateways as processes: a store that
cannot be used stops the start, and a revoke reaches both workers of `server.workers: 2`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.keys import open_store
from tests.integration.test_cli import free_port
from tests.integration.test_operations import accepts, sim
from tests.integration.test_workers import Supervised, holder
from tests.redis_fixture import RedisServer

__all__ = ["sim"]  # the fixture, shared with test_operations
ROOT = Path(__file__).resolve().parents[2]


def write_config(
    tmp_path: Path, store: str, extra: str = "", port: int = 0, backend: str = "http://127.0.0.1:9"
) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"server: {{port: {port}}}\nbackends:\n  gpu: {{url: '{backend}', kind: vllm}}\n"
        f"models:\n  qwen: {{targets: [{{backend: gpu, model: a}}]}}\n  llama: {{targets: [{{backend: gpu, model: b}}]}}\n"
        f"auth: {{store: '{store}'{extra}}}\n"
    )
    return path


def keys(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config), "keys", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(params=["sqlite", "redis"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


def test_create_list_revoke_usage(tmp_path: Path, location: str) -> None:
    """create prints the key once (stdout, or JSON with --json); list never shows it; revoke
    marks it; usage reports; every outcome has its exit code and a message on stderr."""
    config = write_config(tmp_path, location)
    made = keys(
        config, "create", "--name", "team-a", "--models", "qwen", "--expires", "30d", "--rpm", "60"
    )
    assert 0 == made.returncode, made.stderr
    secret = made.stdout.strip()
    assert re.fullmatch(r"ipk_[A-Za-z0-9_-]{43}", secret)
    assert "not shown again" in made.stderr
    as_json = keys(
        config, "create", "--name", "team-b", "--tpm", "1000", "--max-in-flight", "2", "--json"
    )
    record = json.loads(as_json.stdout)
    assert (0, "team-b", "*", 1000, 2) == (
        as_json.returncode,
        record["name"],
        record["models"],
        record["tpm"],
        record["max_in_flight"],
    )
    listed = keys(config, "list", "--json")
    rows = json.loads(listed.stdout)
    assert ["team-a", "team-b"] == [r["name"] for r in rows]
    assert (["qwen"], 60, secret[:10]) == (rows[0]["models"], rows[0]["rpm"], rows[0]["prefix"])
    assert secret not in listed.stdout
    assert record["key"] not in listed.stdout
    table = keys(config, "list").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "PREFIX", "MODELS"]
    assert ["team-a", secret[:10], "qwen"] == table[1].split()[:3]
    assert secret not in "\n".join(table)
    assert 1 == keys(config, "create", "--name", "team-a").returncode  # taken
    revoked = keys(config, "revoke", "team-a")
    assert (0, "") == (revoked.returncode, revoked.stdout)
    assert "revoked key 'team-a'" in revoked.stderr
    assert json.loads(keys(config, "list", "--json").stdout)[0]["revoked"] is not None
    assert 1 == keys(config, "revoke", "nobody").returncode
    usage = keys(config, "usage", "--since", "1h", "--json")
    assert (0, []) == (usage.returncode, json.loads(usage.stdout)["usage"])
    assert "KEY" in keys(config, "usage").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--name", "bad name"], "name 'bad name'"),
        (["create", "--name", "ok", "--expires", "soon"], "neither a duration"),
        (["create", "--name", "ok", "--rpm", "0"], "rpm: must be at least 1"),
        (["create", "--name", "ok", "--models", "a,*"], "'*' means every model"),
        (["usage", "--since", "later"], "neither a duration"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    """A bad argument is exit 2 with one line naming it, and the store is not touched."""
    config = write_config(tmp_path, str(tmp_path / "keys.db"))
    result = keys(config, *args)
    assert 2 == result.returncode
    assert message in result.stderr
    assert 1 == len(result.stderr.splitlines())
    assert not (tmp_path / "keys.db").exists()


def test_keys_without_a_store_exit_2(tmp_path: Path) -> None:
    """A config without auth.store has no keys to manage: exit 2."""
    config = tmp_path / "proxy.yaml"
    config.write_text("backends: {gpu: {url: 'http://127.0.0.1:9'}}\n")
    result = keys(config, "list")
    assert 2 == result.returncode
    assert "sets no auth.store" in result.stderr


def test_an_unreachable_redis_exits_1(tmp_path: Path) -> None:
    """A store that does not answer is exit 1 with one line, quickly."""
    config = write_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    result = keys(config, "list")
    assert 1 == result.returncode
    assert 1 == len(result.stderr.splitlines())
    assert "Redis store redis://127.0.0.1" in result.stderr
    assert time.monotonic() - started < 20


def serve(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def immutable(tmp_path: Path):
    """Make a file unwritable even for root (chattr +i), undone after the test."""
    made: list[Path] = []

    def make(path: Path) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(path)], check=True)
            made.append(path)
        else:
            path.chmod(0o444)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize(
    "fault", ["corrupt", "read-only", "no-directory", "redis-down", "no-pepper"]
)
def test_a_store_that_cannot_be_used_stops_the_start(tmp_path: Path, immutable, fault: str) -> None:
    """A corrupt or read-only SQLite file, a missing directory, an unreachable Redis or an
    unset hash key: one line on stderr, exit 1 (2 for the config's variable), never serving."""
    port = free_port()
    db = tmp_path / "keys.db"
    store, extra, env, code = str(db), "", {}, 1
    if fault == "corrupt":
        db.write_bytes(b"\x00garbage" * 512)
    elif fault == "read-only":
        assert 0 == keys(write_config(tmp_path, str(db)), "list").returncode  # a good store
        immutable(db)
    elif fault == "no-directory":
        store = str(tmp_path / "missing" / "keys.db")
    elif fault == "redis-down":
        store = f"redis://127.0.0.1:{free_port()}/0"
    else:
        extra, code = ", hash_key_env: KEYS_PEPPER", 2
        env = {"KEYS_PEPPER": ""}
    result = serve(write_config(tmp_path, store, extra, port=port), env)
    assert code == result.returncode, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("inference-proxy: ")]
    assert 1 == len(lines), result.stderr
    assert {
        "corrupt": "not a database",
        "read-only": "readonly",
        "no-directory": "no such directory",
        "redis-down": "Redis store",
        "no-pepper": "$KEYS_PEPPER is not set",
    }[fault] in lines[0]
    assert "Traceback" not in result.stderr
    assert not accepts(port)


def request_on_new_connection(port: int, key: str, pids: list[int]) -> tuple[int, int | None]:
    """One request on a connection of its own: its status and the worker that answered it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        worker = None
        for _ in range(50):
            worker = holder(sock.getsockname()[1], port, pids)
            if worker is not None:
                break
            time.sleep(0.002)
        body = b'{"model": "qwen", "max_tokens": 1, "messages": []}'
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )
        head = sock.recv(64)
    return int(head.split()[1]), worker


async def test_a_revoke_reaches_both_workers_within_a_second(sim: str, tmp_path: Path) -> None:
    """server.workers: 2 on one SQLite file: a key made with the CLI is let in by both workers;
    revoked, it is refused by both within one second (each request's worker read from the
    kernel)."""
    port = free_port()
    db = tmp_path / "keys.db"
    config = write_config(tmp_path, str(db), port=port, backend=sim)
    made = keys(config, "create", "--name", "fleet", "--models", "qwen")
    assert 0 == made.returncode, made.stderr
    secret = made.stdout.strip()
    text = config.read_text().replace(
        f"server: {{port: {port}}}", f"server: {{port: {port}, workers: 2}}"
    )
    gw = Supervised(tmp_path, text, port)
    try:
        gw.notify.wait_for("READY", "1")
        pids = list(gw.pids().values())
        assert 2 == len(pids)
        answers = [request_on_new_connection(port, secret, pids) for _ in range(40)]
        assert {200} == {status for status, _ in answers}
        assert set(pids) == {worker for _, worker in answers}, "one worker answered every request"
        store = await open_store(str(db))
        try:
            await store.revoke("fleet", time.time())
        finally:
            await store.close()
        revoked_at = time.monotonic()
        refused: set[int | None] = set()
        while refused != set(pids):
            assert time.monotonic() - revoked_at < 1.0, f"only {refused} refused within a second"
            status, worker = await asyncio.to_thread(request_on_new_connection, port, secret, pids)
            if status == 200:
                refused.discard(worker)  # it had not seen the revoke yet: it must again
            elif status == 401:
                refused.add(worker)
        assert 2 == gw.stderr().count("managed keys: 1 from ")  # each worker read the store
    finally:
        gw.close()
