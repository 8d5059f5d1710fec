"""The upstream leg: a lean HTTP/1.1 client, asyncio protocols and llhttp (httptools) parsing.

`connection` parses one connection's answers (and knows nothing of pools), `response` hands
a body over as it arrives, `pool` keeps each backend's idle connections under a cap, and
`backend` sends a request on them. The rest of the gateway imports from here only.
"""

from proxy.upstream.backend import Backend, fetch, open_backends, send
from proxy.upstream.connection import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    Connection,
    ConnectionClosed,
    State,
)
from proxy.upstream.pool import Pool
from proxy.upstream.response import Response

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "Backend",
    "Connection",
    "ConnectionClosed",
    "Pool",
    "Response",
    "State",
    "fetch",
    "open_backends",
    "send",
]
