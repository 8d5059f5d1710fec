"""`inference-proxy --config FILE keys ...`: create, list, revoke and report on managed keys.

Exit codes: 0 done, 2 a usage or config error, 1 the store failed (or has no such key).
Messages go to standard error; standard output carries only what was asked for.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from typing import TextIO

import msgspec
import uvloop

from proxy.config import Config
from proxy.keys.record import (
    KeyRecord,
    Models,
    hasher_for,
    iso,
    new_key,
    parse_models,
    parse_time,
    public,
)
from proxy.keys.report import usage_report
from proxy.keys.store import NoSuchKey, Store, StoreError, open_store

EXIT_OK, EXIT_STORE, EXIT_USAGE = 0, 1, 2
CLI_TIMEOUT_S = 5.0  # an operator's command may wait longer on Redis than a request does


class UsageError(Exception):
    """A bad argument or config for a keys command (exit 2)."""


def add_keys_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `keys` command and its subcommands."""
    keys = commands.add_parser("keys", help="manage the keys in auth.store")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = sub.add_parser("create", help="make a key and print it (shown only this once)")
    create.add_argument("--name", required=True, help="what lists, logs and usage call it")
    create.add_argument("--models", default="*", help="m1,m2 or * (default: every model)")
    create.add_argument("--expires", help="30d, 12h, or a date such as 2026-12-01 (UTC)")
    for limit, what in (
        ("--rpm", "requests a minute"),
        ("--tpm", "tokens a minute"),
        ("--max-in-flight", "requests at once"),
    ):
        create.add_argument(limit, type=int, help=f"{what} (default: no limit)")
    create.add_argument("--json", action="store_true", help="print the key and record as JSON")
    listing = sub.add_parser("list", help="every key, never its secret")
    listing.add_argument("--json", action="store_true")
    revoke = sub.add_parser("revoke", help="refuse a key everywhere within a second")
    revoke.add_argument("name")
    usage = sub.add_parser("usage", help="requests and tokens per key and model")
    usage.add_argument("--since", default="24h", help="1h, 7d, or a date (default: 24h)")
    usage.add_argument("--json", action="store_true")


def run_keys(
    args: argparse.Namespace,
    config: Config,
    environ: Mapping[str, str],
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run one keys command; its exit code."""
    try:
        if config.auth.store is None:
            raise UsageError("the config sets no auth.store, so there are no managed keys")
        return uvloop.run(_run(args, config.auth.store, config, environ, out, err))
    except UsageError as exc:
        print(f"keys {args.keys_command}: {exc}", file=err)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"keys {args.keys_command}: {exc}", file=err)
        return EXIT_STORE


async def _run(
    args: argparse.Namespace,
    location: str,
    config: Config,
    environ: Mapping[str, str],
    out: TextIO,
    err: TextIO,
) -> int:
    now = time.time()
    if args.keys_command == "create":  # every argument checked before the store is opened
        secret, record = _new(args, config, environ, now)
        store = await open_store(location, CLI_TIMEOUT_S)
        try:
            await store.create(record)
        finally:
            await store.close()
        if args.json:
            print(msgspec.json.encode({"key": secret, **public(record)}).decode(), file=out)
        else:
            print(secret, file=out)
            print(f"created key '{record.name}': store it now, it is not shown again", file=err)
        return EXIT_OK
    since = _time(args.since, now, future=False) if args.keys_command == "usage" else now
    store = await open_store(location, CLI_TIMEOUT_S)
    try:
        return await _query(args, store, since, out, err)
    finally:
        await store.close()


async def _query(
    args: argparse.Namespace, store: Store, since: float, out: TextIO, err: TextIO
) -> int:
    if args.keys_command == "list":
        records = await store.list()
        if args.json:
            print(msgspec.json.encode([public(r) for r in records]).decode(), file=out)
        else:
            _table(out, LIST_COLUMNS, [_row(r) for r in records])
        return EXIT_OK
    if args.keys_command == "revoke":
        try:
            record = await store.revoke(args.name, time.time())
        except NoSuchKey as exc:
            print(f"keys revoke: {exc}", file=err)
            return EXIT_STORE
        print(f"revoked key '{record.name}' (at {iso(record.revoked)})", file=err)
        return EXIT_OK
    report = usage_report(await store.usage(since), since)
    if args.json:
        print(msgspec.json.encode(report).decode(), file=out)
    else:
        rows = report["usage"]
        assert isinstance(rows, list)
        _table(
            out,
            ["KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION"],
            [
                [r["key"], r["model"], r["requests"], r["prompt_tokens"], r["completion_tokens"]]
                for r in rows
            ],
        )
    return EXIT_OK


def _new(
    args: argparse.Namespace, config: Config, environ: Mapping[str, str], now: float
) -> tuple[str, KeyRecord]:
    try:
        models: Models = parse_models(args.models)
        hasher = hasher_for(config.auth.hash_key_env, environ)
        expires = None if args.expires is None else parse_time(args.expires, now, future=True)
        return new_key(
            args.name,
            hasher,
            now,
            models=models,
            expires=expires,
            rpm=args.rpm,
            tpm=args.tpm,
            max_in_flight=args.max_in_flight,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _time(text: str, now: float, *, future: bool) -> float:
    try:
        return parse_time(text, now, future=future)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


LIST_COLUMNS = ["NAME", "PREFIX", "MODELS", "RPM", "TPM", "IN-FLIGHT"]
LIST_COLUMNS += ["CREATED", "EXPIRES", "LAST-USED", "REVOKED"]


def _row(r: KeyRecord) -> list[object]:
    models = r.models if isinstance(r.models, str) else ",".join(r.models)
    times = [iso(r.created), iso(r.expires), iso(r.last_used), iso(r.revoked)]
    return [r.name, r.prefix, models, r.rpm, r.tpm, r.max_in_flight, *times]


def _table(out: TextIO, head: list[str], rows: list[list[object]]) -> None:
    """Columns padded to their widest cell; an empty cell is `-`."""
    cells = [head] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def check_store(config: Config, environ: Mapping[str, str]) -> tuple[int, str] | None:
    """Before serving: whether `auth.store` opens and `auth.hash_key_env` is usable; None
    when all is well, else the exit code and one line saying why."""
    if config.auth.store is None:
        return None
    try:
        hasher_for(config.auth.hash_key_env, environ)
    except ValueError as exc:
        return EXIT_USAGE, str(exc)

    async def probe(location: str) -> None:
        store = await open_store(location, CLI_TIMEOUT_S)
        await store.close()

    try:
        uvloop.run(probe(config.auth.store))
    except StoreError as exc:
        return EXIT_STORE, f"cannot serve without the key store: {exc}"
    return None
