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

`AgreedIndex` is the same bounded LRU for `routing.key_placement: agreed`: there a key's
replica is the stable matching of every key the index holds (proxy/key_matching.py), the
same in every gateway that holds the same keys, not the first placement this gateway made.
A key joins the matching on its second request (until then it is at its rendezvous home,
uncounted), so prompts sent once, a client's flood of fresh prefixes included, never move
the keys that come back. `index_for` picks the class.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from proxy.balance import Affinity, Load, affinity, key_hash, place, rendezvous, rendezvous_scores
from proxy.config import Config
from proxy.key_matching import MatchedKey, Matching, live_backends
from proxy.routing import Target

# How often a model's matching looks again at which of its backends are healthy (at once when
# a request's key lives on one that is not).
RECHECK_S = 0.5


def index_for(config: Config) -> PrefixIndex | AgreedIndex:
    """The index `routing` asks for: `agreed`, or `auto` with several workers, matches keys."""
    routing = config.routing
    agreed = routing.key_placement == "agreed" or (
        routing.key_placement == "auto" and config.server.workers != 1
    )
    return (AgreedIndex if agreed else PrefixIndex)(routing.prefix_index_size)


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
        now: float = 0.0,
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


class AgreedIndex:
    """At most `size` keys, each matched (from its second request) with every other key of its
    model; 0: no index at all."""

    __slots__ = ("_entries", "_groups", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[int, MatchedKey] = OrderedDict()
        self._groups: dict[str, Matching] = {}  # model: its keys' matching

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def counts(self) -> dict[str, int]:
        """Matched keys per backend, whichever model's."""
        out: dict[str, int] = {}
        for group in self._groups.values():
            for name, count in group.count.items():
                if count:
                    out[name] = out.get(name, 0) + count
        return out

    def affinity(
        self,
        model: str,
        key: bytes,
        targets: tuple[Target, ...],
        loads: Mapping[str, Load],
        key_factor: float,
        now: float = 0.0,
    ) -> Affinity:
        """`key`'s `Affinity` for `model`'s `targets`, where the matching has it; a key seen
        for the first time is at its rendezvous home over the healthy targets, uncounted."""
        if not self.size:
            return affinity(key, targets)
        slot = hash((model, key))
        entry = self._entries.get(slot)
        if entry is not None and entry.affinity.of == targets:  # `is`, unless made anew
            self._entries.move_to_end(slot)
            group = entry.group
            if group is None:  # its second request: it joins
                self._group(model, targets, loads, key_factor, now).join(entry)
            elif now >= group.recheck_at or not loads[entry.affinity.home].healthy:
                self._recheck(group, loads, now)
            elif group.todo:  # a repair the last call left unfinished
                group.settle()
            return entry.affinity
        if entry is not None:  # targets a reload changed: the key starts again
            del self._entries[slot]
            if entry.group is not None:
                entry.group.leave(entry)
        ranked, scores = rendezvous_scores(targets, key_hash(key))
        live = live_backends(targets, loads)
        home = next(t.backend for t in ranked if t.backend in live)
        self._entries[slot] = entry = MatchedKey(Affinity(home, ranked, targets), scores)
        if len(self._entries) > self.size:
            _, evicted = self._entries.popitem(last=False)
            if evicted.group is not None:
                evicted.group.leave(evicted)
        return entry.affinity

    def _group(
        self,
        model: str,
        targets: tuple[Target, ...],
        loads: Mapping[str, Load],
        key_factor: float,
        now: float,
    ) -> Matching:
        """`model`'s matching for `targets` (a new one when a reload changed them)."""
        group = self._groups.get(model)
        if group is None or group.targets != targets:
            group = self._groups[model] = Matching(
                targets, live_backends(targets, loads), key_factor
            )
            group.recheck_at = now + RECHECK_S
        return group

    def _recheck(self, group: Matching, loads: Mapping[str, Load], now: float) -> None:
        """Match the group's keys again if its healthy backends changed."""
        group.recheck_at = now + RECHECK_S
        live = live_backends(group.targets, loads)
        if live != group.live:
            group.rebuild(live, [e for e in self._entries.values() if e.group is group])
