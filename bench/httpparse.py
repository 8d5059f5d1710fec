"""A minimal incremental HTTP/1.1 request parser for the simulated backend.

It understands what OpenAI clients and reverse proxies send: a request line, headers, and a
body framed by Content-Length or by chunked transfer encoding. Pure: bytes in, requests out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


class BadRequest(Exception):
    """The bytes on the connection are not an HTTP/1.1 request we can serve."""


@dataclass(slots=True)
class Request:
    """One parsed request: method, target, lower-cased headers and the whole body."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes = b""
    keep_alive: bool = True

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(slots=True)
class RequestParser:
    """Feed bytes; take complete requests out with `next_request()` (pipelining-safe)."""

    buffer: bytearray = field(default_factory=bytearray)
    _head: Request | None = None
    _length: int = -1  # body bytes still expected (Content-Length framing)
    _chunked: bool = False
    _body: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_request(self) -> Request | None:
        """The next complete request, or None when more bytes are needed."""
        if self._head is None and not self._parse_head():
            return None
        if self._chunked:
            done = self._parse_chunked()
        else:
            done = len(self.buffer) >= self._length
            if done:
                self._body += self.buffer[: self._length]
                del self.buffer[: self._length]
        if not done:
            return None
        request = self._head
        assert request is not None
        request.body = bytes(self._body)
        self._head, self._length, self._chunked = None, -1, False
        self._body = bytearray()
        return request

    def wants_continue(self) -> bool:
        """True when a parsed head asked for `Expect: 100-continue` and the body is missing."""
        head = self._head
        return head is not None and head.headers.get("expect", "").lower() == "100-continue"

    def _parse_head(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                raise BadRequest("request head too large")
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            raise BadRequest(f"bad request line: {lines[0][:80]!r}") from None
        if not version.startswith("HTTP/1."):
            raise BadRequest(f"unsupported version {version[:20]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(f"bad header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (
            version == "HTTP/1.1" or "keep-alive" in connection
        )
        self._head = Request(method, target, version, headers, keep_alive=keep_alive)
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if not self._chunked:
            try:
                self._length = int(headers.get("content-length", "0"))
            except ValueError:
                raise BadRequest("bad Content-Length") from None
            if not 0 <= self._length <= MAX_BODY:
                raise BadRequest("Content-Length out of range")
        return True

    def _parse_chunked(self) -> bool:
        """Consume whole chunks from the buffer; True once the last chunk and trailers are in."""
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size_text = bytes(self.buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest("bad chunk size") from None
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return False
                del self.buffer[: trailer_end + 4]
                return True
            start = line_end + 2
            if len(self.buffer) < start + size + 2:
                return False
            self._body += self.buffer[start : start + size]
            if len(self._body) > MAX_BODY:
                raise BadRequest("chunked body too large")
            del self.buffer[: start + size + 2]
