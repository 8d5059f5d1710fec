"""Merging the workers' metric snapshots: the rules, called with values, no server."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.exposition import Family, Series, render
from proxy.metrics import Metrics
from proxy.metrics_merge import Snapshot, decode, encode, merge
from proxy.workermetrics import Worker, worker_from_env

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parsed(families: list[Family]) -> Samples:
    """The rendered text read back by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(render(families).decode())
        for s in family.samples
    }


def worker_metrics(requests: int, durations: list[float], in_flight: int, up: bool) -> Metrics:
    m = Metrics(["gpu"])
    m.requests["/v1/chat/completions", "m", "gpu", "200"] += requests
    for d in durations:
        m.duration["/v1/chat/completions", "m"].observe(d)
    m.in_flight = lambda: {"gpu": in_flight}
    m.queue_depth = lambda: in_flight // 2
    m.backend_up = lambda: {"gpu": up}
    return m


def two_workers() -> Samples:
    w0 = worker_metrics(7, [0.02] * 7, in_flight=3, up=True)
    w1 = worker_metrics(5, [0.3] * 4 + [5000.0], in_flight=4, up=False)
    w1.tokens["m", "prompt"] += 11  # a label set only worker 1 has
    merged = merge([("0", w0.families()), ("1", w1.families())], 2)
    assert [] == merged.left_out
    return parsed(merged.families)


ROUTE = (("model", "m"), ("route", "/v1/chat/completions"))


def test_counters_are_summed_per_label_set() -> None:
    """7 requests on one worker and 5 on the other are 12; a series one worker lacks is kept."""
    got = two_workers()
    labels = (("backend", "gpu"), *ROUTE, ("status", "200"))
    assert 12 == got["proxy_requests_total", labels]
    assert 11 == got["proxy_tokens_total", (("kind", "prompt"), ("model", "m"))]


def test_histograms_are_summed_bucket_by_bucket() -> None:
    """Each bucket, `_count` and `_sum` are the workers' sums; the buckets stay cumulative."""
    got = two_workers()
    bucket = "proxy_request_duration_seconds_bucket"
    assert 7 == got[bucket, (("le", "0.025"), *ROUTE)]
    assert 11 == got[bucket, (("le", "0.5"), *ROUTE)]
    assert 12 == got[bucket, (("le", "+Inf"), *ROUTE)]
    assert 12 == got["proxy_request_duration_seconds_count", ROUTE]
    assert (
        pytest.approx(7 * 0.02 + 4 * 0.3 + 5000) == got["proxy_request_duration_seconds_sum", ROUTE]
    )
    le = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in got.items()
        if name == bucket
    )
    assert [v for _, v in le] == sorted(v for _, v in le)


def test_in_flight_and_queue_depth_are_summed() -> None:
    """Requests in flight are in one worker each, so the gateway's figure is their sum."""
    got = two_workers()
    assert 7 == got["proxy_in_flight_requests", (("backend", "gpu"),)]
    assert 1 + 2 == got["proxy_queue_depth", ()]


def test_backend_up_and_process_metrics_are_per_worker() -> None:
    """Each worker probes on its own and is its own process: a `worker` label, never a sum."""
    got = two_workers()
    assert 1 == got["proxy_backend_up", (("backend", "gpu"), ("worker", "0"))]
    assert 0 == got["proxy_backend_up", (("backend", "gpu"), ("worker", "1"))]
    assert ("proxy_backend_up", (("backend", "gpu"),)) not in got
    for worker in ("0", "1"):
        assert got["process_resident_memory_bytes", (("worker", worker),)] > 0
        assert ("process_cpu_seconds_total", (("worker", worker),)) in got
    assert not [key for key in got if key[0].startswith("process_") and not key[1]]


def test_answered_count_shows_a_missing_worker() -> None:
    """With one of three workers answering, the scrape says 1 of 3."""
    merged = merge([("2", Metrics(["gpu"]).families())], 3)
    got = parsed(merged.families)
    assert 3 == got["proxy_workers", ()]
    assert 1 == got["proxy_workers_answered", ()]


def test_one_worker_merged_renders_what_it_renders_alone() -> None:
    """Merging one snapshot changes no value: the same series, plus the worker label where
    the rules put one and the two worker-count gauges."""
    m = worker_metrics(7, [0.02, 0.4], in_flight=1, up=True)
    m.ttft["m", "gpu"].observe(0.3)
    alone = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
        if not s.name.startswith("process_")  # CPU seconds move between the two reads
    }
    merged = parsed(merge([("0", m.families())], 1).families)
    relabelled = {
        (name, tuple(sorted({**dict(labels), "worker": "0"}.items())))
        if name in ("proxy_backend_up", "proxy_limits_degraded")  # per worker, like every gauge
        else (name, labels): value
        for (name, labels), value in alone.items()
    }
    del merged["proxy_workers", ()], merged["proxy_workers_answered", ()]
    assert relabelled == {k: v for k, v in merged.items() if not k[0].startswith("process_")}


def test_histograms_with_other_bounds_stay_cumulative() -> None:
    """A worker started under another max_request_s has other duration bounds: the merged
    histogram is exact at shared bounds and +Inf, and cumulative everywhere."""
    short, long = Metrics(["gpu"], max_request_s=90), Metrics(["gpu"], max_request_s=3600)
    for value in (0.02, 50.0, 80.0):
        short.duration["/v1/chat/completions", "m"].observe(value)
    for value in (0.02, 80.0, 1000.0):
        long.duration["/v1/chat/completions", "m"].observe(value)
    merged = merge([("0", short.families()), ("1", long.families())], 2)
    got = parsed(merged.families)
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in got.items()
        if name == "proxy_request_duration_seconds_bucket"
    }
    assert 2 == buckets["0.025"]  # shared
    assert 3 + 1 == buckets["90.0"]  # only short's: long counted at its 60 s bound
    assert 3 + 2 == buckets["120.0"]  # only long's: short counted at its 90 s bound (all 3)
    assert 6 == buckets["+Inf"]
    ordered = [v for _, v in sorted((float(le), v) for le, v in buckets.items())]
    assert ordered == sorted(ordered)


def counter(value: float, *, labels: tuple[str, ...] = (), kind: str = "counter") -> Family:
    series = [Series([f"v{i}" for i in range(len(labels))], [value])]
    return Family("proxy_requests", kind, "help", labels, series)  # type: ignore[arg-type]


def histogram(bounds: tuple[float, ...], values: list[float]) -> Family:
    return Family("proxy_h", "histogram", "help", (), [Series([], values)], bounds)


def test_peer_families_that_do_not_fit_are_left_out_with_a_reason() -> None:
    """A peer's unknown family, one of another type or other labels, or series of another
    shape are left out (and said why); the rest of its snapshot still counts."""
    own = [counter(1), histogram((1.0,), [0, 1, 1.5])]
    peers = [
        [counter(2), Family("proxy_surprise", "gauge", "h", (), [Series([], [1])])],
        [counter(5, kind="gauge")],
        [counter(9, labels=("model",))],
        [Family("proxy_requests", "counter", "help", (), [Series([], [1, 2])])],
        [Family("proxy_requests", "counter", "help", (), [Series(["x"], [1])])],
        [histogram((2.0, 1.0), [0, 0, 0, 0])],
        [histogram((float("inf"),), [0, 0, 0])],
        [histogram((1.0,), [1, 1])],
        [Family("proxy_requests", "counter", "help", (), [Series([], [1])], (1.0,))],
    ]
    snapshots = [("0", own), *((str(i), p) for i, p in enumerate(peers, 1))]
    merged = merge(snapshots, 1 + len(peers))
    got = parsed(merged.families)
    assert 3 == got["proxy_requests_total", ()]
    assert 1 == got["proxy_h_count", ()]
    assert [
        "worker 1: proxy_surprise: not a family of this worker",
        "worker 2: proxy_requests: gauge, not counter",
        "worker 3: proxy_requests: labels ['model'], not []",
        "worker 4: proxy_requests: a series of another shape",
        "worker 5: proxy_requests: a series of another shape",
        "worker 6: proxy_h: bounds not finite and increasing",
        "worker 7: proxy_h: bounds not finite and increasing",
        "worker 8: proxy_h: a series of another shape",
        "worker 9: proxy_requests: bounds on a family that is not a histogram",
    ] == merged.left_out


def test_per_worker_series_are_one_per_worker() -> None:
    """Per-worker families take the worker label from who was asked; a peer that sends a
    label set twice still makes one series."""
    own = [Family("proxy_backend_up", "gauge", "h", ("backend",), [Series(["g"], [1])])]
    peer = [
        Family("proxy_backend_up", "gauge", "h", ("backend",), [Series(["g"], [0])] * 2),
    ]
    text = render(merge([("0", own), ("1", peer)], 2).families).decode()
    assert 'proxy_backend_up{backend="g",worker="0"} 1.0' in text
    assert 'proxy_backend_up{backend="g",worker="1"} 0.0' in text
    assert 2 == text.count("proxy_backend_up{")


def test_snapshot_round_trips() -> None:
    """What a worker encodes, its peer decodes to the same families."""
    snapshot = Snapshot(
        1, 1_700_000_000_000_000_000, 5, worker_metrics(3, [0.1], 0, True).families()
    )
    assert snapshot == decode(encode(snapshot))


def snapshot(*families: list[object]) -> bytes:
    return msgspec.msgpack.encode([1, 1, 1, list(families)])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\x00garbage",
        b'{"json": "is not msgpack"}',
        msgspec.msgpack.encode([2, 1, 1, []]),  # another version
        msgspec.msgpack.encode([1, []]),  # no start and time
        snapshot(["proxy_x", "gauge", "h", ["bad-label"], [], []]),
        snapshot(["proxy x", "gauge", "h", [], [], []]),
        snapshot(["proxy_x", "summary", "h", [], [], []]),
        snapshot(["proxy_x", "gauge", "h", [], [[[], ["1"]]], []]),
        snapshot(["proxy_x", "gauge", "h", [], [[[1], [1]]], []]),
        snapshot(["proxy_x", "gauge", "h", [], [], [], "extra"]),
    ],
)
def test_garbage_is_not_a_snapshot(data: bytes) -> None:
    """Bytes that are not a version-1 snapshot with valid names and types are refused whole."""
    with pytest.raises(msgspec.DecodeError):
        decode(data)


def test_worker_from_env() -> None:
    """The three variables make a worker; none of them is one process; anything else is an
    error said at startup."""
    assert worker_from_env({}) is None
    worker = worker_from_env(
        {
            "INFERENCE_PROXY_WORKER": "1",
            "INFERENCE_PROXY_WORKERS": "3",
            "INFERENCE_PROXY_RUN_DIR": "/run/x",
        }
    )
    assert Worker(1, 3, "/run/x") == worker
    assert [0, 2] == worker.peers
    assert "/run/x/worker-2.sock" == worker.socket_path(2)


@pytest.mark.parametrize(
    "env",
    [
        {"INFERENCE_PROXY_WORKER": "0"},
        {
            "INFERENCE_PROXY_WORKER": "2",
            "INFERENCE_PROXY_WORKERS": "2",
            "INFERENCE_PROXY_RUN_DIR": "/r",
        },
        {
            "INFERENCE_PROXY_WORKER": "-1",
            "INFERENCE_PROXY_WORKERS": "2",
            "INFERENCE_PROXY_RUN_DIR": "/r",
        },
        {
            "INFERENCE_PROXY_WORKER": "0",
            "INFERENCE_PROXY_WORKERS": "2",
            "INFERENCE_PROXY_RUN_DIR": "",
        },
    ],
)
def test_worker_from_env_refuses_what_does_not_fit(env: dict[str, str]) -> None:
    """A partial or out-of-range set of variables is a ValueError, not a guess."""
    with pytest.raises(ValueError, match="INFERENCE_PROXY_WORKER"):
        worker_from_env(env)
