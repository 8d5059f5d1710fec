"""`routing.key_placement: agreed`: the matching of keys to replicas (proxy/key_matching.py)
and the index that feeds it (AgreedIndex). The reference is the matching made from scratch:
every (key, replica) pair by score, highest first, taken while the key is unplaced and the
replica has room; it is the only stable one, so the incremental one must equal it after any
sequence of joins, leaves and changes of the healthy set, in any order."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.balance import Affinity, Load, affinity, affinity_key, key_hash, rendezvous_scores
from proxy.config import load_config
from proxy.key_matching import MOVES, MatchedKey, Matching
from proxy.prefix_index import AgreedIndex, PrefixIndex, index_for
from proxy.routing import Target

A, B, C = Target("a", None, 1.0), Target("b", None, 1.0), Target("c", None, 1.0)
ABC = (A, B, C)
IDLE = {name: Load(in_flight=0, limit=None, up=True) for name in "abcd"}


def down(*names: str) -> dict[str, Load]:
    return {**IDLE, **{n: Load(0, None, up=False, healthy=False) for n in names}}


def key_bytes(i: int, tag: str = "tenant") -> bytes:
    return affinity_key(None, f"{tag} {i} system prompt ".encode() * 90, 2048)


def matched_key(i: int, targets: tuple[Target, ...]) -> MatchedKey:
    ranked, scores = rendezvous_scores(targets, key_hash(key_bytes(i)))
    return MatchedKey(Affinity(ranked[0].backend, ranked, targets), scores)


def reference(
    keys: list[MatchedKey], targets: tuple[Target, ...], live: tuple[str, ...], factor: float
) -> dict[int, str]:
    """The stable matching from scratch, by id of key."""
    weights = {n: sum(t.weight for t in targets if t.backend == n) for n in live}
    total = sum(weights.values())
    caps = {n: math.ceil(factor * len(keys) * w / total) for n, w in weights.items()}
    pairs = sorted(
        ((k.score(n), id(k), n, k) for k in keys for n in live), key=lambda p: p[0], reverse=True
    )
    out: dict[int, str] = {}
    for _, ident, name, _k in pairs:
        if ident not in out and caps[name] > 0:
            out[ident] = name
            caps[name] -= 1
    return out


def placement(keys: list[MatchedKey]) -> dict[int, str]:
    return {id(k): k.affinity.home for k in keys}


def settled(group: Matching) -> Matching:
    while group.todo:
        group.settle()
    return group


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from("jjjllh"), st.integers(0, 39)), max_size=200),
    weights=st.sampled_from([(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (1.0, 3.0, 0.5)]),
    factor=st.sampled_from([1.0, 1.25, 1.5]),
)
def test_the_matching_is_the_one_made_from_scratch_after_any_changes(
    ops: list[tuple[str, int]], weights: tuple[float, float, float], factor: float
) -> None:
    """Joins (j), leaves (l) and health flips (h) in any mix: the kept matching is the
    reference over the keys it holds and the backends that are live."""
    targets = tuple(Target(n, None, w) for n, w in zip("abc", weights, strict=True))
    pool = [matched_key(i, targets) for i in range(60)]
    group = Matching(targets, ("a", "b", "c"), factor)
    members: dict[int, MatchedKey] = {}
    live_sets = [("a", "b", "c"), ("a", "c"), ("b",), ("a", "b")]
    flips = 0
    for op, i in ops:
        key = pool[i]
        if op == "j" and i not in members:
            members[i] = key
            group.join(key)
        elif op == "l" and i in members:
            group.leave(members.pop(i))
        elif op == "h":
            flips += 1
            group.rebuild(live_sets[flips % len(live_sets)], list(members.values()))
        settled(group)
    keys = list(members.values())
    assert placement(keys) == reference(keys, targets, group.live, factor)
    assert group.count == {n: sum(k.affinity.home == n for k in keys) for n in group.live}
    assert all(group.count[n] <= group.caps[n] for n in group.live)


def test_long_random_histories_end_at_the_reference() -> None:
    """Long histories (hypothesis's are short): 300 seeded runs of 200 joins and leaves of
    40 keys, some with a replica going down and back, each ending at the reference."""
    for seed in range(300):
        rng = random.Random(seed)
        pool = [matched_key(i, ABC) for i in range(40)]
        group = Matching(ABC, ("a", "b", "c"), 1.0)
        members: dict[int, MatchedKey] = {}
        for step in range(200):
            i = rng.randrange(40)
            if rng.random() < 0.55 and i not in members:
                members[i] = pool[i]
                group.join(pool[i])
            elif i in members:
                group.leave(members.pop(i))
            if seed % 10 == 0 and step % 50 == 49:
                live = ("a", "c") if group.live == ("a", "b", "c") else ("a", "b", "c")
                group.rebuild(live, list(members.values()))
            settled(group)
        keys = list(members.values())
        assert placement(keys) == reference(keys, ABC, group.live, 1.0), seed


def test_the_order_keys_come_in_changes_nothing() -> None:
    """Two matchings given the same 48 keys in different orders, one of them also seeing
    keys that come and go, place every key alike, 16 a replica."""
    first, second = Matching(ABC, ("a", "b", "c"), 1.0), Matching(ABC, ("a", "b", "c"), 1.0)
    one = [matched_key(i, ABC) for i in range(48)]
    two = [matched_key(i, ABC) for i in range(48)]
    extra = [matched_key(100 + i, ABC) for i in range(20)]
    for key in one:
        first.join(key)
    order = list(range(48))
    random.Random(3).shuffle(order)
    for n, i in enumerate(order):
        second.join(two[i])
        if n < 20:
            second.join(extra[n])
    for key in extra:
        second.leave(key)
    settled(first), settled(second)
    assert [k.affinity.home for k in one] == [k.affinity.home for k in two]
    assert {"a": 16, "b": 16, "c": 16} == first.count == second.count


def test_one_call_moves_no_more_than_its_budget_and_the_next_calls_finish() -> None:
    """`settle` stops after `MOVES` moves and leaves the rest to the calls after it, which
    end at the reference: here 300 keys whose home is one replica, each there, as a rebuild
    starts them (the one repair allowed to go further)."""
    group = Matching(ABC, ("a", "b", "c"), 1.0)
    pool = (matched_key(i, ABC) for i in range(2_000))
    keys = [k for k in pool if k.affinity.home == "a"][:300]
    for key in keys:  # what `join` does for each, without its repair
        key.group = group
        group.n += 1
        group._put(key, key.affinity.home, counted=False)
    group._bound()
    group.settle()
    moved = sum(k.affinity.home != k.affinity.ranked[0].backend for k in keys)
    assert 0 < moved <= MOVES and group.todo
    settled(group)
    assert placement(keys) == reference(keys, ABC, group.live, 1.0)


def lives(index: AgreedIndex, i: int, loads: dict[str, Load] = IDLE, now: float = 0.0) -> str:
    return index.affinity("m", key_bytes(i), ABC, loads, 1.0, now).home


def test_a_key_is_counted_from_its_second_request_and_then_stays() -> None:
    """Seen once, a key is at its rendezvous home and not counted; from its second request
    it is matched, and a settled matching moves nothing."""
    index = AgreedIndex(100)
    homes = {i: affinity(key_bytes(i), ABC).home for i in range(30)}
    assert all(lives(index, i) == homes[i] for i in range(30))
    assert {} == index.counts  # seen once each: nothing matched yet
    for i in range(30):  # each joins, and may move keys that joined before it
        lives(index, i)
    assert {"a": 10, "b": 10, "c": 10} == index.counts
    placed = {i: lives(index, i) for i in range(30)}
    assert placed == {i: lives(index, i) for i in range(30)}  # settled: nothing moves


def test_two_gateways_that_each_see_a_random_half_agree_on_every_key() -> None:
    """The prefix workload's shape: 48 keys, each gateway sent every request by a coin."""
    first, second = AgreedIndex(1000), AgreedIndex(1000)
    coin = random.Random(5)
    for _ in range(800):
        lives((first, second)[coin.randrange(2)], coin.randrange(48))
    assert all(lives(first, i) == lives(second, i) for i in range(48))
    assert {"a": 16, "b": 16, "c": 16} == first.counts == second.counts


def test_a_flood_of_fresh_prefixes_moves_no_key_that_comes_back() -> None:
    """Prompts sent once never join the matching: a client sending 5,000 fresh prefixes
    churns the index and moves none of the 30 keys in use, and none is evicted."""
    index = AgreedIndex(300)
    for _ in range(3):  # seen, joined, settled
        placed = {i: lives(index, i) for i in range(30)}
    for n in range(5_000):
        index.affinity("m", affinity_key(None, b"hostile %d " % n * 200, 2048), ABC, IDLE, 1.0)
        if n % 100 == 0:
            assert placed == {i: lives(index, i) for i in range(30)}
    assert 300 == len(index) and 30 == sum(index.counts.values())


def test_keys_leave_a_replica_that_goes_down_and_come_back_with_it() -> None:
    """A replica fails its health checks: its keys are matched over the others at once; back
    up, the matching is the one it was (every gateway, up or down alike, agrees again)."""
    index = AgreedIndex(100)
    for _ in range(3):  # seen, joined, settled
        before = {i: lives(index, i) for i in range(30)}
    gone = before[0]
    during = {i: lives(index, i, down(gone), now=1.0) for i in range(30)}
    assert gone not in during.values() and sum(index.counts.values()) == 30
    assert max(index.counts.values()) == 15
    assert before == {i: lives(index, i, now=2.0) for i in range(30)}  # rechecked: back


def test_new_targets_start_the_keys_again_and_evicted_keys_leave_the_matching() -> None:
    index = AgreedIndex(20)
    for _ in range(2):
        for i in range(20):
            lives(index, i)
    assert 20 == sum(index.counts.values())
    for i in range(20, 30):
        lives(index, i)  # ten new keys evict ten matched ones
    assert (20, 10) == (len(index), sum(index.counts.values()))
    two = (A, B)
    for _ in range(2):
        homes = {i: index.affinity("m", key_bytes(i), two, IDLE, 1.0).home for i in range(8)}
    assert set(homes.values()) == {"a", "b"}


def test_the_placement_a_config_asks_for() -> None:
    """`auto` matches with several workers; `sticky` and `agreed` say what they mean."""
    base = "backends: {a: {url: 'http://127.0.0.1:1'}}\n"
    cases = {
        "": PrefixIndex,
        "server: {workers: 2}\n": AgreedIndex,
        "server: {workers: 0}\n": AgreedIndex,
        "routing: {key_placement: agreed}\n": AgreedIndex,
        "server: {workers: 2}\nrouting: {key_placement: sticky}\n": PrefixIndex,
    }
    for extra, kind in cases.items():
        assert type(index_for(load_config(base + extra))) is kind, extra
