"""CPU per request of the key check alone: no auth, static keys, managed keys (issue 11).

`python -m bench.keys_auth` prints one table: microseconds per `authenticate` call (the
median of several runs), for a good key, a wrong key, and a revoked one.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import timeit

import msgspec
from multidict import CIMultiDict

from proxy.auth import KeySet, authenticate
from proxy.errors import AuthenticationFailed
from proxy.keys import Hasher, ManagedKeys, new_key, new_secret

CALLS = 20_000
RUNS = 7


def per_call_us(fn: object) -> float:
    timer = timeit.Timer(fn)  # type: ignore[arg-type]
    return statistics.median(timer.timeit(CALLS) / CALLS * 1e6 for _ in range(RUNS))


def refused(headers: CIMultiDict[str], keys: KeySet, managed: ManagedKeys | None) -> None:
    with contextlib.suppress(AuthenticationFailed):
        authenticate(headers, keys, None, managed)


def main() -> None:
    now = time.time()
    rows: list[tuple[str, float, float | None, float | None]] = []
    none = KeySet([])
    rows.append(("no auth", per_call_us(lambda: authenticate(CIMultiDict(), none)), None, None))
    for count in (1, 10, 100):
        static = [new_secret() for _ in range(count)]
        keys = KeySet(static)
        good = CIMultiDict({"Authorization": f"Bearer {static[-1]}"})
        bad = CIMultiDict({"Authorization": f"Bearer {new_secret()}"})
        rows.append(
            (
                f"static, {count} key(s)",
                per_call_us(lambda k=keys, h=good: authenticate(h, k)),
                per_call_us(lambda k=keys, h=bad: refused(h, k, None)),
                None,
            )
        )
    for count in (1, 1000, 100_000):
        managed = ManagedKeys("bench", Hasher())
        made = [new_key(f"k{i}", Hasher(), now) for i in range(count)]
        secret, record = made[-1]
        managed.replace(1, [r for _, r in made])
        good = CIMultiDict({"Authorization": f"Bearer {secret}"})
        bad = CIMultiDict({"Authorization": f"Bearer {new_secret()}"})
        revoked_map = ManagedKeys("bench", Hasher())
        revoked_map.replace(1, [msgspec.structs.replace(record, revoked=now)])
        rows.append(
            (
                f"managed, {count} key(s)",
                per_call_us(lambda m=managed, h=good: authenticate(h, none, None, m)),
                per_call_us(lambda m=managed, h=bad: refused(h, none, m)),
                per_call_us(lambda m=revoked_map, h=good: refused(h, none, m)),
            )
        )
    print(f"{'keys':<24}{'good key µs':>12}{'wrong key µs':>14}{'revoked µs':>12}")
    for name, good_us, bad_us, revoked_us in rows:
        cells = [f"{v:.2f}" if v is not None else "-" for v in (good_us, bad_us, revoked_us)]
        print(f"{name:<24}{cells[0]:>12}{cells[1]:>14}{cells[2]:>12}")


if __name__ == "__main__":
    main()
