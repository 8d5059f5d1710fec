"""Where the `affinity` policy placed each key lately: a bounded LRU, one per gateway state.

The index maps a key's digest to the backend the key was placed on, and counts the entries
of each backend (what `balance.place` bounds). The digest is 8 bytes of blake2b over the key
and the model's name, made from the hash the rendezvous order is made from, so a request's
key is hashed once; an entry costs the same whatever `routing.prefix_bytes` is (about 160
bytes), and two keys whose digests collide only share a replica. The index never holds more
than `routing.prefix_index_size` entries: a key past that evicts the least recently used
one, so a client that sends a new prefix with every request only churns it. Backends are
config names, so the counts are bounded by the config too. The decision is `balance.place`'s;
this class only remembers it, and hands `order` the result in the key (`balance.pin`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from proxy.balance import key_hash, pin, place
from proxy.routing import Target


class PrefixIndex:
    """At most `size` keys, each with the backend it was placed on; 0: no index at all."""

    __slots__ = ("_entries", "counts", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self.counts: dict[str, int] = {}  # entries per backend

    def __len__(self) -> int:
        return len(self._entries)

    def route(
        self,
        model: str,
        key: bytes,
        targets: Sequence[Target],
        up: Mapping[str, bool],
        key_factor: float,
    ) -> bytes:
        """`key` pinned to the backend it lives on (placed now if the index does not hold it,
        or holds it on a backend that is not up or not a target); `key` as is with no index
        or nothing to choose between."""
        if not self.size or not key or len(targets) < 2:
            return key
        keyed = key_hash(key)
        entry = keyed.copy()
        entry.update(b"\0\0" + model.encode())  # a backend's digest adds one zero byte
        digest = entry.digest()
        was = self._entries.get(digest)
        backend = place(targets, up, keyed, was, self.counts, key_factor)
        if was is None:
            self._entries[digest] = backend
            self.counts[backend] = self.counts.get(backend, 0) + 1
            if len(self._entries) > self.size:
                _, evicted = self._entries.popitem(last=False)
                self.counts[evicted] -= 1
        else:
            self._entries.move_to_end(digest)
            if backend != was:  # its replica went away: the key moves, and its count with it
                self._entries[digest] = backend
                self.counts[was] -= 1
                self.counts[backend] = self.counts.get(backend, 0) + 1
        return pin(key, backend)
