"""`affinity` with the gateway's index of keys: placement bounded by keys per replica
(balance.place), the order `order` gives a placed key, and the bounded LRU that remembers
(PrefixIndex)."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter

import pytest

from proxy.balance import Affinity, Load, affinity, affinity_key, key_hash, order, place, rendezvous
from proxy.config import ConfigError, load_config
from proxy.prefix_index import PrefixIndex
from proxy.routing import Target

A, B, C = Target("a", None, 1.0), Target("b", None, 1.0), Target("c", None, 1.0)
ABC = (A, B, C)
IDLE = {name: Load(in_flight=0, limit=None, up=True) for name in "abc"}


def home(key: bytes, targets: tuple[Target, ...] = ABC) -> str:
    """The key's rendezvous home, where `order` sends it with no index."""
    return order("affinity", targets, IDLE, random.Random(0), affinity(key, targets))[0][0].backend


def ranked(key: bytes, targets: tuple[Target, ...] = ABC) -> list[Target]:
    """The targets in the key's rendezvous order."""
    return rendezvous(targets, key_hash(key))


def placed(key: bytes, where: str | None, counts: dict[str, int], factor: float = 1.0) -> str:
    """`place` over a, b and c, all healthy."""
    return place(ranked(key), IDLE, where, counts, factor)


def down(*names: str) -> dict[str, Load]:
    """a, b and c idle, those named probed down."""
    return {**IDLE, **{n: Load(0, None, up=False, healthy=False) for n in names}}


def lives(index: PrefixIndex, key: bytes, loads: dict[str, Load] = IDLE, model: str = "m") -> str:
    """Where the index has `key` for `model` (a, b and c its targets)."""
    return index.affinity(model, key, ABC, loads, 1.0).home


def keys(count: int, tag: str = "tenant") -> list[bytes]:
    return [
        affinity_key(None, f"{tag} {i} system prompt ".encode() * 90, 2048) for i in range(count)
    ]


def test_rendezvous_is_order_s_ranking() -> None:
    """`rendezvous` over the hashed key is the order `order` gives a key with no index."""
    for key in keys(50):
        by_order = order("affinity", ABC, IDLE, random.Random(0), affinity(key, ABC))[0]
        assert by_order == ranked(key)


def test_a_new_key_goes_home_while_its_home_holds_no_more_than_its_share() -> None:
    """With nothing indexed, and with every replica at its share, a key goes to its home."""
    key = keys(1)[0]
    assert home(key) == placed(key, None, {})
    assert home(key) == placed(key, None, {"a": 5, "b": 5, "c": 5})


def test_a_new_key_passes_over_a_home_above_its_share() -> None:
    """A home holding more than its share of the indexed keys (this one counted, rounded up)
    passes the key to the next replica in the key's rendezvous order."""
    key = keys(1)[0]
    crowded = {home(key): 6, **{n: 0 for n in "abc" if n != home(key)}}
    assert ranked(key)[1].backend == placed(key, None, crowded)


def test_keys_split_evenly_however_the_hash_falls() -> None:
    """48 keys placed one by one with the index's counts land 16/16/16 (the hash alone puts
    them unevenly); with a loose bound (1e9) every key stays at its home."""
    tenants = keys(48)
    homes = Counter(home(k) for k in tenants)
    assert max(homes.values()) - min(homes.values()) > 1  # the hash's own split is uneven
    for factor, expected in ((1.0, Counter({"a": 16, "b": 16, "c": 16})), (1e9, homes)):
        counts: Counter[str] = Counter()
        for key in tenants:
            counts[placed(key, None, counts, factor)] += 1
        assert expected == counts


def test_keys_split_by_weight() -> None:
    """A replica of weight 2 takes twice the keys of each of the others."""
    heavy = Target("a", None, 2.0)
    counts: Counter[str] = Counter()
    for key in keys(400):
        counts[place(ranked(key, (heavy, B, C)), IDLE, None, counts, 1.0)] += 1
    assert Counter({"a": 200, "b": 100, "c": 100}) == counts


def test_a_placed_key_sticks_while_its_replica_is_up() -> None:
    """A key placed on `b` stays there (its cache is there) though `b` now holds more than
    its share; it moves only when `b` is down or no longer a target of the model."""
    key = keys(1)[0]
    heavy = {"a": 0, "b": 40, "c": 0}
    assert "b" == placed(key, "b", heavy)
    assert "b" != place(ranked(key), down("b"), "b", heavy, 1.0)
    assert "b" != place(ranked(key, (A, C)), IDLE, "b", heavy, 1.0)
    shedding = {**IDLE, "b": Load(0, None, up=False, healthy=True)}  # a 429 just now
    assert "b" == place(ranked(key), shedding, "b", heavy, 1.0)


def test_with_every_replica_down_keys_are_still_placed() -> None:
    """Probes failing fleet-wide: the key is placed over all targets, as `order` spreads."""
    key = keys(1)[0]
    assert home(key) == lives(PrefixIndex(10), key, down("a", "b", "c"))


def test_order_leads_with_the_replica_the_key_lives_on() -> None:
    """A key the index placed on a replica other than its home is served there (`affinity`);
    when that replica is down, or not a target, the key's home among the others leads (the
    placed replica down comes last)."""
    key = keys(1)[0]
    order_ = tuple(ranked(key))
    other = order_[2].backend
    got, reason = order("affinity", ABC, IDLE, random.Random(0), Affinity(other, order_, ABC))
    assert ("affinity", other) == (reason, got[0].backend)
    got, _ = order("affinity", ABC, down(other), random.Random(0), Affinity(other, order_, ABC))
    assert (home(key), other) == (got[0].backend, got[-1].backend)
    got, _ = order("affinity", ABC, IDLE, random.Random(0), Affinity("gone", order_, ABC))
    assert ranked(key) == got


def test_a_placed_replica_over_the_load_bound_is_passed_over_for_this_request() -> None:
    """Past the in-flight bound the request goes to the key's next replica in rendezvous
    order (`rebalanced`), the placed one last; the placement stays the index's, so the next
    request leads with the placed replica again once it is calm."""
    key = keys(1)[0]
    order_ = tuple(ranked(key))
    where = order_[1].backend
    busy = {**IDLE, where: Load(30, None, up=True)}
    got, reason = order("affinity", ABC, busy, random.Random(0), Affinity(where, order_, ABC))
    others = [t for t in order_ if t.backend != where]
    assert ("rebalanced", [*others, order_[1]]) == (reason, got)


def test_the_index_remembers_where_it_placed_a_key() -> None:
    """A key is placed once and kept after, each model apart: a key it holds gets the same
    entry back (nothing hashed again, nothing made); the counts say how many keys each
    backend holds, whichever model's (one cache per server)."""
    index = PrefixIndex(100)
    key = keys(1)[0]
    first = index.affinity("m", key, ABC, IDLE, 1.0)
    assert all(first is index.affinity("m", key, ABC, IDLE, 1.0) for _ in range(3))
    assert (home(key), tuple(ranked(key))) == (first.home, first.ranked)
    again = lives(index, key, model="other-model")
    assert again != home(key)  # the home holds its share (1 of 2 keys, rounded up) already
    assert (2, {home(key): 1, again: 1}) == (len(index), index.counts)


def test_a_key_whose_replica_went_down_moves_with_its_count() -> None:
    """The replica of a placed key goes down: the key is placed again and its count moves;
    once the replica is back the key stays where it moved (its cache is there now)."""
    index = PrefixIndex(100)
    key = keys(1)[0]
    was = lives(index, key)
    now = lives(index, key, down(was))
    assert now != was
    assert {was: 0, now: 1} == {n: index.counts[n] for n in (was, now)}
    assert now == lives(index, key)


def test_targets_a_reload_made_keep_the_keys_where_they_live() -> None:
    """A reload builds new targets: equal ones find the entry as it was; changed ones (a new
    weight) order the held key again for them, and it stays on its replica while that one is
    still a target; a key whose replica left moves."""
    index = PrefixIndex(100)
    key = keys(1)[0]
    was = index.affinity("m", key, ABC, IDLE, 1.0)
    same = (Target("a", None, 1.0), Target("b", None, 1.0), Target("c", None, 1.0))
    assert was is index.affinity("m", key, same, IDLE, 1.0)
    reweighed = (Target("a", None, 2.0), Target("b", None, 2.0), Target("c", None, 2.0))
    now = index.affinity("m", key, reweighed, IDLE, 1.0)
    assert (was.home, reweighed) == (now.home, now.of)
    assert all(any(t is r for r in reweighed) for t in now.ranked)
    left = tuple(t for t in reweighed if t.backend != was.home)
    assert was.home != index.affinity("m", key, left, IDLE, 1.0).home
    assert (1, 1) == (len(index), sum(index.counts.values()))


def test_a_fresh_prefix_per_request_only_churns_the_index() -> None:
    """A client sending 20,000 new prefixes fills the index to its size and no further: its
    memory stays what a full index takes, the counts add up to what it holds, and a key used
    all along is not evicted by the flood."""
    index = PrefixIndex(256)
    regular = keys(1, "regular")[0]
    where = lives(index, regular)

    def flood(start: int, count: int) -> None:
        for i in range(start, start + count):
            lives(index, affinity_key(None, b"hostile %d " % i * 200, 2048))
            if i % 100 == 0:
                assert where == lives(index, regular)

    tracemalloc.start()
    try:
        flood(0, 2_000)  # every entry made anew while traced: a full index's memory
        full = tracemalloc.get_traced_memory()[0]
        flood(2_000, 20_000)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - full < 4096, (full, after)
    assert 256 == len(index) == sum(index.counts.values())
    assert max(index.counts.values()) - min(index.counts.values()) <= 2


def test_no_index_keeps_no_entry() -> None:
    """`prefix_index_size: 0`: each request's key is hashed for its rendezvous home, and
    nothing is kept."""
    key = keys(1)[0]
    none = PrefixIndex(0)
    assert (home(key), 0, {}) == (lives(none, key), len(none), none.counts)


def test_two_gateways_agree_on_keys_they_both_see_in_the_same_order() -> None:
    """Two indexes fed the same keys place each alike; a fresh one puts a key at its home."""
    first, second = PrefixIndex(1000), PrefixIndex(1000)
    for key in keys(60):
        assert lives(first, key) == lives(second, key)
    key = keys(1, "new")[0]
    assert home(key) == lives(PrefixIndex(10), key)


def test_routing_config_keys() -> None:
    """The defaults, and 0 (no index)."""
    one = "backends: {a: {url: 'http://h:1'}}\n"
    routing = load_config(one).routing
    assert (10_000, 1.0) == (routing.prefix_index_size, routing.key_load_factor)
    assert 0 == load_config(one + "routing: {prefix_index_size: 0}\n").routing.prefix_index_size


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("routing: {prefix_index_size: -1}", "routing.prefix_index_size: must be 0 (no index) or more"),
        ("routing: {key_load_factor: 0.9}", "routing.key_load_factor: must be a number of 1 or more"),
        ("routing: {key_load_factor: .nan}", "routing.key_load_factor: must be a number of 1 or more"),
        ("routing: {prefix_index_size: 1.5}", "routing.prefix_index_size: expected `int`, got `float`"),
    ],
)  # fmt: skip
def test_bad_routing_values_are_reported_under_their_key(text: str, error: str) -> None:
    """Each bad value of the index's settings is a config error naming its key."""
    with pytest.raises(ConfigError) as caught:
        load_config(text + "\n")
    assert any(error in e for e in caught.value.errors), caught.value.errors
