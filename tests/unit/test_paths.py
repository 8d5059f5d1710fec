"""Paths forwarded under a prefix: as the client encoded them, never decoded into the line."""

from __future__ import annotations

import pytest

from proxy.errors import InvalidRequest
from proxy.paths import subpath


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/models/ep/proxy/v1/rerank?truncate=true", "/v1/rerank"),
        ("/models/ep/proxy/a%20b", "/a%20b"),  # the client's escape kept as sent
        ("/models/ep/proxy/a%3Fb%23c", "/a%3Fb%23c"),  # not turned into a query or fragment
        ("/models/ep/proxy/x%2Fy", "/x%2Fy"),  # an encoded slash stays encoded
        ("/models/ep/proxy/caf\u00e9", "/caf%C3%A9"),  # what must be encoded is
        ("/models/ep/proxy/a b", "/a%20b"),
        ("/models/ep/proxy/", "/"),
        ("/models/e%2Fp/proxy/v1/x", "/v1/x"),  # segments are counted on the raw path
        ("/models/ep/proxy/%ff", "/%ff"),  # not UTF-8 once decoded: still forwarded encoded
    ],
)
def test_subpath_keeps_the_clients_encoding(raw: str, expected: str) -> None:
    """The forwarded path is the client's, re-encoded only where a request line needs it."""
    assert expected == subpath(raw, 3)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        ("/models/ep/proxy/a%0d%0aX-Injected:%201", "control character"),
        ("/models/ep/proxy/a%09b", "control character"),
        ("/models/ep/proxy/a%7f", "control character"),
        ("/models/ep/proxy/a%00", "control character"),
        ("/models/ep/proxy/../admin", "'.' or '..' segment"),
        ("/models/ep/proxy/%2e%2e/admin", "'.' or '..' segment"),
        ("/models/ep/proxy/a/%2E/b", "'.' or '..' segment"),
        ("/models/ep/proxy/a/..", "'.' or '..' segment"),
    ],
)
def test_subpath_refuses_control_characters_and_dot_segments(raw: str, what: str) -> None:
    """A control character or a dot segment, sent plain or percent-encoded, is a 400."""
    with pytest.raises(InvalidRequest) as caught:
        subpath(raw, 3)
    assert what in caught.value.message
