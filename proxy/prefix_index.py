"""Where the `affinity` policy placed each key lately: a bounded LRU, one per gateway state.

The index maps a key (with the model's name) to its `balance.Affinity`: the backend the key
was placed on and the targets in the key's rendezvous order, so a key it holds is neither
hashed with blake2b nor ordered again; it counts the entries of each backend (what
`balance.place` bounds). An entry is found by Python's own hash of the model and the key:
the key itself is not kept, so an entry costs the same whatever `routing.prefix_bytes` is
(about 240 bytes), and two keys whose hashes collide only share a replica. That hash is
seeded per process; it orders nothing another gateway must agree on (the rendezvous order
is blake2b's). The index never holds more than `routing.prefix_index_size` entries: a key
past that evicts the least recently used one, so a client that sends a new prefix with every
request only churns it. Backends are config names, so the counts are bounded by the config
too. The decision is `balance.place`'s; this class only remembers it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from proxy.balance import Affinity, Load, affinity, key_hash, place, rendezvous
from proxy.routing import Target


class PrefixIndex:
    """At most `size` keys, each with the backend it was placed on; 0: no index at all."""

    __slots__ = ("_entries", "counts", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[int, Affinity] = OrderedDict()
        self.counts: dict[str, int] = {}  # entries per backend

    def __len__(self) -> int:
        return len(self._entries)

    def affinity(
        self,
        model: str,
        key: bytes,
        targets: tuple[Target, ...],
        loads: Mapping[str, Load],
        key_factor: float,
    ) -> Affinity:
        """`key`'s `Affinity` for `model`'s `targets`: where the index has it while that
        backend is healthy and one of them, else placed now; with no index, its hash's."""
        if not self.size:
            return affinity(key, targets)
        slot = hash((model, key))
        was = self._entries.get(slot)
        ranked: tuple[Target, ...] | None = None
        if was is not None and was.of == targets:  # `is`, unless the plan was made anew
            if loads[was.home].healthy:  # the common case: nothing hashed, nothing made
                self._entries.move_to_end(slot)
                return was
            ranked = was.ranked
        if ranked is None:  # a new key, or targets a reload made
            ranked = tuple(rendezvous(targets, key_hash(key)))
        backend = place(ranked, loads, was.home if was else None, self.counts, key_factor)
        self._entries[slot] = entry = Affinity(backend, ranked, targets)
        if was is None:
            self.counts[backend] = self.counts.get(backend, 0) + 1
            if len(self._entries) > self.size:
                _, evicted = self._entries.popitem(last=False)
                self.counts[evicted.home] -= 1
        else:
            self._entries.move_to_end(slot)
            if backend != was.home:  # its replica went away: the key moves, and its count with it
                self.counts[was.home] -= 1
                self.counts[backend] = self.counts.get(backend, 0) + 1
        return entry
