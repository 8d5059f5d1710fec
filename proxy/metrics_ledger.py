"""The workers' last known counts, so the merged counters never go down (pure).

Prometheus reads any fall of a counter as a reset to zero and counts the whole new value as an
increase: a sum over workers that lost a worker's share for one scrape (it was restarting, or
slow) would show a spike in every `rate()`. So whichever worker a scrape lands on records, in
a ledger file in the run directory, the latest counters and histograms of every worker, and
merges from the ledger rather than from the answers alone:

- a worker that did not answer is counted at the last counts any scrape saw from it;
- a worker that answers as a new process (a later start) retires its predecessor's last
  counts, which stay in the totals (`retired`) for as long as the run directory lives.

What a worker counted after the last scrape before it died is lost: the totals fall short by
that much, but they do not fall. `proxy/workermetrics.py` reads and writes the file under a
lock; this module only decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from proxy.exposition import Family
from proxy.metrics_merge import Part, Snapshot, carried, sum_families


class Ledger(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """Each worker's latest carried counts (by index), and its predecessors' summed."""

    version: Literal[1]
    workers: dict[str, Snapshot]
    retired: list[Family]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Ledger)


def encode(ledger: Ledger) -> bytes:
    return _encoder.encode(ledger)


def decode(data: bytes) -> Ledger:
    """Raises msgspec.DecodeError when `data` is not a ledger."""
    return _decoder.decode(data)


def reconcile(ledger: Ledger | None, answers: Mapping[str, Snapshot]) -> Ledger:
    """The ledger after this scrape's `answers` (worker index -> snapshot).

    An answer replaces its worker's entry when it is newer: the same process later, or a
    process started later, whose predecessor's entry is then retired. An older answer (a
    concurrent scrape already recorded a newer one) changes nothing.
    """
    workers = dict(ledger.workers) if ledger else {}
    retiring: list[list[Family]] = [ledger.retired] if ledger else []
    for worker, answer in answers.items():
        known = workers.get(worker)
        if known is None or answer.started_ns > known.started_ns:
            if known is not None:
                retiring.append(known.families)
        elif answer.started_ns < known.started_ns or answer.taken_ns <= known.taken_ns:
            continue
        families = [f for f in answer.families if carried(f)]
        workers[worker] = Snapshot(1, answer.started_ns, answer.taken_ns, families)
    retired = retiring[0] if len(retiring) == 1 else sum_families(retiring)
    return Ledger(1, workers, retired)


def counted(ledger: Ledger) -> list[Part]:
    """What the totals are made of: each worker's latest counts, then the retired ones."""
    parts: list[Part] = [(w, ledger.workers[w].families) for w in sorted(ledger.workers, key=int)]
    parts.append(("retired", ledger.retired))
    return parts
