"""systemd's readiness protocol: datagrams to `$NOTIFY_SOCKET` (sd_notify(3)), no library.

`make run` uses the same socket to learn that its own gateway, not some other process on the
port, is serving. With no `$NOTIFY_SOCKET` every call does nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

logger = logging.getLogger("proxy")


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address `$NOTIFY_SOCKET` names ('@' is Linux's abstract namespace), or None."""
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def notify(environ: Mapping[str, str], *lines: str) -> None:
    """Send `KEY=VALUE` lines to the service manager; a failure is logged, never raised."""
    address = notify_address(environ)
    if address is None:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        logger.warning("could not notify the service manager at %s: %s", address, exc)
