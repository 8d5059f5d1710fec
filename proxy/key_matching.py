"""`routing.key_placement: agreed`: where a model's keys live, as a function of the keys alone.

Every gateway that holds the same keys, over the same healthy replicas, places each of them
on the same replica, whatever order the keys came in and whatever else each gateway saw: the
placement is the stable matching of keys to replicas, each replica holding at most
`key_load_factor` times its share (by weight) of the keys, rounded up. Both sides rank by
one number, the key's rendezvous score for the replica (`balance.rendezvous_scores`): a key
prefers the replicas it scores highest for (its home first), a full replica keeps the keys
that score highest for it. With preferences that come from one number per pair the stable
matching is unique (take the pair with the highest score, match it, and so on), so any
sequence of repairs that ends with no blocking pair ends at the same placement, and two
gateways that repair in different orders agree.

Kept incrementally, per model: each replica's keys in a heap (the one it would give up
first on top), and for each replica the keys that would rather live there than where they
do (best first). A key that joins takes its home; a replica over its bound gives up its
lowest key, which tries its next replica (Gale and Shapley's proposals); a replica with room
takes the best key waiting for it, whose old place then has room (a vacancy chain). Heaps
drop stale entries as they meet them and are rebuilt when stale entries outnumber live ones.
A change of the healthy set places every key afresh (health changes are rare; the work is
bounded by the index's size). Each call does at most `MOVES` moves and leaves the rest to the
next call, so no request pays for a long chain (a client grinding keys for one cannot make
one request slow). Pure: no clock, no I/O; the index (proxy/prefix_index.py) feeds it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping

from proxy.balance import Affinity, Load
from proxy.routing import Target

# Moves (a key from one replica to another) one call may make; the rest wait for the next.
MOVES = 64


class MatchedKey:
    """One key in the index: where it lives (`affinity`), its targets in its rendezvous order
    and their scores, and the matching it belongs to (None: seen once, at its home, not
    matched yet)."""

    __slots__ = ("affinity", "group", "scores")

    def __init__(self, affinity: Affinity, scores: tuple[float, ...]) -> None:
        self.affinity = affinity
        self.scores = scores
        self.group: Matching | None = None

    def score(self, backend: str) -> float:
        """The key's score for `backend` (its first target there)."""
        for target, score in zip(self.affinity.ranked, self.scores, strict=True):
            if target.backend == backend:
                return score
        return -math.inf

    def __lt__(self, other: MatchedKey) -> bool:  # heap ties (equal scores): any fixed order
        return id(self) < id(other)


Heap = list[tuple[float, MatchedKey]]
_Valid = Callable[[MatchedKey, str], bool]


def live_backends(targets: tuple[Target, ...], loads: Mapping[str, Load]) -> tuple[str, ...]:
    """The targets' backends keys may live on: the healthy ones, or all when none is."""
    names = tuple(dict.fromkeys(t.backend for t in targets))
    return tuple(n for n in names if loads[n].healthy) or names


class Matching:
    """The keys of one model's `targets`, matched to its live backends."""

    __slots__ = ("caps", "count", "factor", "held", "live", "n", "recheck_at", "targets", "todo",
                 "waiting", "weights")  # fmt: skip

    def __init__(self, targets: tuple[Target, ...], live: tuple[str, ...], factor: float) -> None:
        self.targets = targets
        self.factor = factor
        self.n = 0  # keys matched
        self.todo: set[str] = set()  # backends that may have a blocking pair
        self.recheck_at = 0.0  # when the index looks at the healthy set again (its clock)
        self._reset(live)

    def _reset(self, live: tuple[str, ...]) -> None:
        self.live = live
        self.weights = {n: 0.0 for n in live}
        for t in self.targets:
            if t.backend in self.weights:
                self.weights[t.backend] += t.weight
        self.caps = {n: 0 for n in live}
        self.count = {n: 0 for n in live}
        self.held: dict[str, Heap] = {n: [] for n in live}  # lowest score first
        self.waiting: dict[str, Heap] = {n: [] for n in live}  # negated: highest first
        self._bound()

    def _bound(self) -> None:
        """Each live backend's bound for `n` keys: `factor` times its share, rounded up."""
        total = sum(self.weights.values())
        for name, weight in self.weights.items():
            cap = math.ceil(self.factor * self.n * weight / total)
            if cap != self.caps[name]:
                self.caps[name] = cap
                self.todo.add(name)

    def join(self, key: MatchedKey) -> None:
        """A key enters: at its first live target, then repaired."""
        key.group = self
        self.n += 1
        self._bound()
        self._put(key, self._first_live(key), counted=False)
        self.settle()

    def leave(self, key: MatchedKey) -> None:
        """A key leaves (the index evicted it): its place has room, the bounds shrink."""
        key.group = None
        self.n -= 1
        home = key.affinity.home
        self.count[home] -= 1
        self.todo.add(home)
        self._bound()
        self.settle()

    def rebuild(self, live: tuple[str, ...], members: Iterable[MatchedKey]) -> None:
        """The healthy set changed: every member placed afresh over `live`."""
        keys = list(members)
        self._reset(live)
        for key in keys:
            self._put(key, self._first_live(key), counted=False)
        self.todo = set(live)
        self.settle(moves=MOVES + len(keys) * len(live))

    def settle(self, moves: int = MOVES) -> None:
        """Repair blocking pairs until none is left, or `moves` moves were made."""
        while self.todo:
            name = self.todo.pop()
            moves = self._repair(name, moves)
            if moves <= 0:
                self.todo.add(name)  # unfinished: the next call goes on
                return

    def _repair(self, name: str, moves: int) -> int:
        """Fix `name`'s blocking pairs: give up its lowest keys while it is over its bound,
        take the best waiting key while it has room or that key outscores its lowest."""
        held, waiting, cap = self.held[name], self.waiting[name], self.caps[name]
        while moves > 0:
            if self.count[name] > cap:
                lowest = self._top(held, name, self._lives_at)
                below = self._next_live(lowest, name) if lowest is not None else None
                if lowest is None or below is None:
                    return moves  # no replica below: it stays (only with a bound under 1)
                heapq.heappop(held)
                self._put(lowest, below)
                self._push(waiting, (-lowest.score(name), lowest), name, self._would_move)
                moves -= 1
                continue
            best = self._top(waiting, name, self._would_move)
            if best is None:
                return moves
            if self.count[name] >= cap:
                lowest = self._top(held, name, self._lives_at)
                if lowest is not None and best.score(name) <= held[0][0]:
                    return moves
            heapq.heappop(waiting)
            self._put(best, name)  # if that left it over its bound, the loop gives one up
            moves -= 1
        return moves

    def _put(self, key: MatchedKey, name: str, counted: bool = True) -> None:
        """Move `key` to `name`, from where it lived (`counted`: and was counted there)."""
        was = key.affinity
        if counted:
            self.count[was.home] -= 1
            self.todo.add(was.home)
        self.count[name] += 1
        self.todo.add(name)
        key.affinity = Affinity(name, was.ranked, was.of)
        self._push(self.held[name], (key.score(name), key), name, self._lives_at)

    def _push(self, heap: Heap, entry: tuple[float, MatchedKey], name: str, valid: _Valid) -> None:
        """Push `entry`; entries go stale lazily (dropped as they reach the top), and a heap
        that holds more than twice the keys is cut to its true entries, each once."""
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self.n + 16:
            kept = {id(e[1]): e for e in heap if valid(e[1], name)}
            heap[:] = list(kept.values())
            heapq.heapify(heap)

    def _first_live(self, key: MatchedKey) -> str:
        return next(t.backend for t in key.affinity.ranked if t.backend in self.count)

    def _next_live(self, key: MatchedKey, name: str) -> str | None:
        """The first live backend after `name` in the key's order, or None."""
        score = key.score(name)
        return next(
            (t.backend for t, s in zip(key.affinity.ranked, key.scores, strict=True)
             if s < score and t.backend != name and t.backend in self.count),
            None,
        )  # fmt: skip

    def _lives_at(self, key: MatchedKey, name: str) -> bool:
        return key.group is self and key.affinity.home == name

    def _would_move(self, key: MatchedKey, name: str) -> bool:
        return key.group is self and key.score(name) > key.score(key.affinity.home)

    @staticmethod
    def _top(heap: Heap, name: str, valid: _Valid) -> MatchedKey | None:
        """The heap's first entry that is still true, dropping the stale ones above it."""
        while heap:
            key = heap[0][1]
            if valid(key, name):
                return key
            heapq.heappop(heap)
        return None
