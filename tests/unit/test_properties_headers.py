"""Properties of the header readers: headers, gateway keys and the timeout header of any value
give an answer or our own error, never another exception."""

from __future__ import annotations

import base64
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.auth import ANONYMOUS, AuthenticationFailed, KeySet, Principal, authenticate
from proxy.config import TimeoutsConfig
from proxy.errors import InvalidRequest
from proxy.headers import (
    HOP_BY_HOP,
    downstream_headers,
    is_event_stream,
    upstream_headers,
)
from proxy.timeouts import request_budget
from tests.unit.test_properties_json import FAST

REQUEST_ID = st.from_regex(r"[A-Za-z0-9._:@/+=-]{1,128}", fullmatch=True)
NAMES = st.sampled_from(
    [
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "Authorization",
        "x-api-key",
        "X-Goog-Api-Key",
        "Host",
        "Content-Length",
        "Content-Type",
        "X-Request-ID",
        "Expect",
        "TE",
        "Upgrade",
        "Cache-Control",
        "X-Custom",
    ]
) | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
VALUES = (
    st.sampled_from(
        [
            "text/event-stream",
            " Text/Event-Stream ; charset=utf-8",
            "application/json",
            "keep-alive, X-Custom",
            "close",
            "",
            ",,,",
        ]
    )
    | st.text(max_size=30)
    | NAMES.map(lambda n: f"{n}, te , ")
)
RAW_HEADERS = st.lists(
    st.tuples(
        NAMES.map(lambda n: n.encode()) | st.binary(min_size=1, max_size=8),
        VALUES.map(lambda v: v.encode("utf-8", "surrogateescape")) | st.binary(max_size=20),
    ),
    max_size=8,
)


def _names(lines: bytes) -> list[bytes]:
    return [line.split(b": ", 1)[0].lower() for line in lines.split(b"\r\n") if line]


@FAST
@given(RAW_HEADERS, REQUEST_ID)
def test_upstream_headers_drop_credentials_and_hop_by_hop(
    client: list[tuple[bytes, bytes]], request_id: str
) -> None:
    """Any client headers give header lines without credentials or hop-by-hop names, id last."""
    lines = upstream_headers(client, request_id=request_id)
    assert lines.endswith(b"X-Request-ID: " + request_id.encode() + b"\r\n")
    forbidden = HOP_BY_HOP | {b"authorization", b"x-api-key", b"x-goog-api-key", b"host"}
    names = _names(lines)
    assert [] == [n for n in names if n in forbidden]
    assert 1 == names.count(b"x-request-id")


@FAST
@given(RAW_HEADERS, REQUEST_ID)
def test_downstream_headers_drop_hop_by_hop(
    upstream: list[tuple[bytes, bytes]], request_id: str
) -> None:
    """Any backend headers give a header map without hop-by-hop names, with our request id."""
    out = downstream_headers(upstream, request_id=request_id)
    assert [request_id] == out.getall("X-Request-ID")
    assert [] == [n for n in out if n.lower().encode("latin-1") in HOP_BY_HOP]
    listed = {
        token.strip().lower()
        for name, value in upstream
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    assert [] == [n for n in out if n.lower().encode("latin-1") in listed]
    if is_event_stream(out.get("Content-Type", "")):
        assert "no" == out["X-Accel-Buffering"]


@FAST
@given(VALUES)
def test_is_event_stream_reads_any_content_type(content_type: str) -> None:
    """Any Content-Type gives a yes or no: yes exactly when its media type is text/event-stream."""
    expected = content_type.split(";")[0].strip().lower() == "text/event-stream"
    assert expected == is_event_stream(content_type)


# --- authenticate ------------------------------------------------------------------------

KEYS = KeySet(["sk-alpha", "sk-beta"])
KEY_TEXT = st.sampled_from(["sk-alpha", "sk-beta", "sk-nope", "", " "]) | st.text(max_size=12)
BASIC_PAYLOADS = (
    st.tuples(KEY_TEXT, KEY_TEXT).map(
        lambda up: base64.b64encode(f"{up[0]}:{up[1]}".encode()).decode()
    )
    | st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode())
    | st.text(max_size=16)
)
AUTHORIZATION = (
    st.tuples(st.sampled_from(["Bearer", "bearer", "Basic", "BASIC", "Token", ""]), BASIC_PAYLOADS)
    .map(" ".join)
    .map(lambda v: v.center(len(v) + 2))
    | KEY_TEXT.map(lambda k: f"Bearer {k}")
    | st.text(max_size=20)
)
AUTH_HEADERS = st.dictionaries(
    st.sampled_from(["Authorization", "x-api-key", "X-Goog-Api-Key", "X-Other"]),
    AUTHORIZATION | KEY_TEXT,
    max_size=3,
)


@FAST
@given(AUTH_HEADERS, st.none() | KEY_TEXT)
def test_authenticate_gives_a_principal_or_authentication_failed(
    headers: dict[str, str], query_key: str | None
) -> None:
    """Any header values and query key give a configured key's principal, or a 401."""
    try:
        principal = authenticate(CIMultiDict(headers), KEYS, query_key)
    except AuthenticationFailed:
        return
    assert principal in (Principal("key-0"), Principal("key-1"))


@FAST
@given(AUTH_HEADERS, st.none() | KEY_TEXT)
def test_no_keys_lets_anyone_in(headers: dict[str, str], query_key: str | None) -> None:
    """With no keys configured, any request is anonymous, whatever it carries."""
    assert ANONYMOUS == authenticate(CIMultiDict(headers), KeySet([]), query_key)


def test_basic_credentials_that_are_not_ascii_are_a_401() -> None:
    """A Basic payload with non-ASCII characters is malformed credentials (it was a 500)."""
    with pytest.raises(AuthenticationFailed) as caught:
        authenticate(CIMultiDict({"Authorization": "Basic é"}), KEYS)
    assert "malformed HTTP Basic credentials" == caught.value.message


# --- the timeout header --------------------------------------------------------------------

TIMEOUTS = TimeoutsConfig(request_s=120.0, max_request_s=600.0)
NUMBERS = st.floats(min_value=0, allow_nan=False).map(repr) | st.integers(-5, 10**500).map(str)
HEADER_VALUES = (
    NUMBERS
    | st.tuples(st.text(" \t\xa0\x1c\u2003\u180e", max_size=2), NUMBERS).map("".join)
    | st.text(alphabet=st.sampled_from("0123456789.eE+- \t\u0663\u00b2x_"), max_size=12)
    | st.text(max_size=12)
)


@FAST
@given(HEADER_VALUES)
def test_request_budget_is_a_bounded_positive_number_or_invalid_request(header: str) -> None:
    """Any header value gives a finite positive budget no larger than the maximum, or a 400."""
    try:
        seconds = request_budget(header, TIMEOUTS)
    except InvalidRequest:
        return
    assert math.isfinite(seconds)
    assert 0 < seconds <= TIMEOUTS.max_request_s


@pytest.mark.parametrize(
    "header",
    [
        "0\x1f",  # a separator regex `\s` takes and float() refuses: it was a 500
        "\u0663",  # Arabic-Indic three: it was silently taken as 3 seconds
        "\xa05",  # a no-break space is not HTTP whitespace
    ],
)
def test_only_ascii_decimals_between_spaces_are_timeouts(header: str) -> None:
    """Separators and digits beyond ASCII decimals and spaces or tabs are a 400."""
    with pytest.raises(InvalidRequest) as caught:
        request_budget(header, TIMEOUTS)
    assert caught.value.message.startswith("OICM-Request-Timeout must be a positive number")
