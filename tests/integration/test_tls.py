"""TLS on both legs, with certificates made in the test (trustme): the gateway serving HTTPS
to aiohttp and the openai SDK, what it does with clients that do not speak TLS or never
finish the handshake, https backends verified against a CA file, the clear 502 when a
backend's certificate is not trusted or names another host, and bad files as config errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
import trustme
from aiohttp.test_utils import TestServer
from cryptography import x509

from proxy.app import create_app, serve_app
from proxy.config import BackendConfig, ConfigError, load_config
from proxy.errors import BackendUnreachable
from proxy.reload import Reloader
from proxy.state import LIVE
from proxy.tls import check_files
from proxy.upstream import Backend, send
from tests.conftest import Upstream, one_backend
from tests.fakes import FakeUpstream, stream_script
from tests.integration.test_metrics import samples, value

ROOT = Path(__file__).resolve().parents[2]
MODELS = "models:\n  chat: {targets: [{backend: gpu, model: up-chat}]}\n"
CHAT = b'{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """The test CA and a certificate for 127.0.0.1 and localhost, as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(paths["cert"], append=i > 0)
    return {k: str(p) for k, p in paths.items()}


def tls_server(pems: dict[str, str], backend_url: str, extra: str = "") -> str:
    return one_backend(
        backend_url,
        models=MODELS,
        extra=f"server: {{tls: {{cert_file: '{pems['cert']}', key_file: '{pems['key']}'}}"
        f"{extra}}}\n",
    )


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test CA only."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
async def tls_gateway(gateway_factory, upstream: Upstream, pems: dict[str, str]):
    """A gateway serving HTTPS (head timeout 0.5 s) in front of the plain-http fake upstream."""
    gw = await gateway_factory(tls_server(pems, upstream.url, ", header_timeout_s: 0.5"))
    gw.url = gw.url.replace("http://", "https://")
    return gw


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# The gateway serving HTTPS ------------------------------------------------------------------


async def test_https_streams_a_chat_completion(tls_gateway, upstream, ca) -> None:
    """An aiohttp client trusting the test CA gets a streamed chat completion over HTTPS; the
    plain-http backend behind it gets the body byte for byte (only `model` rewritten)."""
    upstream.script["/v1/chat/completions"] = stream_script(tokens=3)
    connector = aiohttp.TCPConnector(ssl=trusting(ca))
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.post(tls_gateway.url + "/v1/chat/completions", data=CHAT) as r:
            assert 200 == r.status
            events = [line async for line in r.content if line.startswith(b"data: ")]
        async with s.get(tls_gateway.url + "/health") as r:
            assert {"status": "ok"} == await r.json()
    assert b"data: [DONE]\n" == events[-1]
    assert CHAT.replace(b'"chat"', b'"up-chat"') == upstream.last.body


async def test_openai_sdk_over_https(tls_gateway, upstream, ca) -> None:
    """The openai SDK with an httpx client trusting the test CA streams through the gateway."""
    upstream.script["/v1/chat/completions"] = stream_script(tokens=4)
    client = openai.AsyncOpenAI(
        base_url=tls_gateway.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(verify=trusting(ca)),
    )
    async with client:
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "t0t1t2t3" == text


async def test_alpn_offers_http11_only_and_tls12_is_the_floor(tls_gateway, ca) -> None:
    """A client offering h2 gets http/1.1 by ALPN; one capped at TLS 1.1 cannot connect."""
    port = port_of(tls_gateway.url)
    context = trusting(ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ("http/1.1", True) == (
        ssl_object.selected_alpn_protocol(),
        ssl_object.version() in ("TLSv1.2", "TLSv1.3"),
    )
    writer.close()
    old = trusting(ca)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # a client willing to speak TLS 1.1...
    with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
        await asyncio.open_connection("127.0.0.1", port, ssl=old)
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value)  # ...is refused by the server


def raw_exchange(port: int, data: bytes, within_s: float = 5.0) -> tuple[bytes, float]:
    """Send `data` on a plain TCP connection, read until the server closes; what came back
    and how long the server took to close."""
    with socket.create_connection(("127.0.0.1", port), timeout=within_s) as sock:
        started = time.monotonic()
        sock.sendall(data)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
        return got, time.monotonic() - started


async def test_plain_http_to_the_tls_port_is_closed_and_harms_nothing(
    tls_gateway, ca, caplog
) -> None:
    """A plain-HTTP request to the HTTPS port is closed at once, without an HTTP answer or
    an error logged; HTTPS requests before and after it are served."""
    port = port_of(tls_gateway.url)
    connector = aiohttp.TCPConnector(ssl=trusting(ca))
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.get(tls_gateway.url + "/health") as r:
            assert 200 == r.status
        with caplog.at_level(logging.DEBUG):
            got, took = await asyncio.to_thread(
                raw_exchange, port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            )
        async with s.get(tls_gateway.url + "/health") as r:
            assert 200 == r.status
    assert not got.startswith(b"HTTP/")
    assert took < 0.4  # refused by the handshake, not left to the head timeout
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "sent",
    [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],  # nothing; a ClientHello's start
    ids=["silent", "half-hello"],
)
async def test_unfinished_handshake_is_closed_by_the_head_timeout(tls_gateway, sent) -> None:
    """A client that opens a connection and never finishes the TLS handshake is closed after
    server.header_timeout_s (0.5 s here), not held open."""
    got, took = await asyncio.to_thread(raw_exchange, port_of(tls_gateway.url), sent)
    assert not got.startswith(b"HTTP/")
    assert 0.4 < took < 2.0


# https backends ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def https_upstream(cert: trustme.LeafCert) -> AsyncIterator[Upstream]:
    """The fake upstream serving HTTPS with `cert`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    fake = FakeUpstream()
    server = TestServer(fake.app(), host="127.0.0.1", handler_cancellation=True)
    await server.start_server(ssl=context)
    try:
        yield Upstream(fake, f"https://127.0.0.1:{server.port}")
    finally:
        await server.close()


def https_backend(url: str, ca_file: str | None, extra: str = "") -> str:
    ca = f", ca_file: '{ca_file}'" if ca_file else ""
    return f"backends:\n  gpu: {{url: '{url}', kind: vllm{ca}}}\n{MODELS}{extra}"


async def chat(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", data=CHAT) as r:
            return r.status, await r.read()


async def upstream_errors(url: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            got = samples(await r.text())
    return value(got, "proxy_upstream_errors_total", backend="gpu", type="backend_unreachable")


async def test_https_backend_with_ca_file_streams(gateway_factory, ca, pems) -> None:
    """A backend at an https URL whose certificate the ca_file's CA signed is verified and
    streams; its TLS connections are kept alive and reused, all made with the backend's one
    SSLContext."""
    async with https_upstream(ca.issue_cert("127.0.0.1")) as up:
        up.script["/v1/chat/completions"] = stream_script(tokens=3)
        gw = await gateway_factory(https_backend(up.url, pems["ca"]))
        status, body = await chat(gw.url)
        assert (200, True) == (status, body.endswith(b"data: [DONE]\n\n"))
        assert 3 == body.count(b'"content":"t')
        assert 200 == (await chat(gw.url))[0]
        pool = gw.state.backends["gpu"].pool  # two chats and a health probe went through it
        assert 1 <= len(pool.open) <= 2
        assert 2 <= max(conn.requests for conn in pool.open)
        assert {pool.ssl} == {c.transport.get_extra_info("sslcontext") for c in pool.open}  # type: ignore[union-attr]


def error_of(body: bytes) -> dict[str, str]:
    return orjson.loads(body)["error"]


async def test_backend_signed_by_an_unknown_ca_is_a_clear_502(gateway_factory, pems) -> None:
    """A backend whose certificate no trusted CA signed (here: not the ca_file's CA) gets a
    502 backend_unreachable naming TLS verification, counted in proxy_upstream_errors_total;
    no request reaches it."""
    stranger = trustme.CA()
    async with https_upstream(stranger.issue_cert("127.0.0.1")) as up:
        gw = await gateway_factory(https_backend(up.url, pems["ca"]))
        status, body = await chat(gw.url)
        assert 502 == status
        error = error_of(body)
        assert "backend_unreachable" == error["type"]
        assert error["message"].startswith(
            f"TLS verification of backend 127.0.0.1:{port_of(up.url)}"
        )
        assert "unable to get local issuer certificate" in error["message"]
        assert 1 == await upstream_errors(gw.url)
        assert [] == up.posts


async def test_system_store_is_the_default_trust(gateway_factory) -> None:
    """Without a ca_file the system's CAs are trusted, and they never signed a test CA's
    certificate: the same clear 502."""
    async with https_upstream(trustme.CA().issue_cert("127.0.0.1")) as up:
        gw = await gateway_factory(https_backend(up.url, None))
        status, body = await chat(gw.url)
    assert (502, True) == (status, "TLS verification" in error_of(body)["message"])


@pytest.mark.parametrize(
    ("names", "host", "says"),
    [
        (("gpu.internal",), "127.0.0.1", "IP address mismatch"),
        (("127.0.0.1", "gpu.internal"), "localhost", "Hostname mismatch"),
    ],
)
async def test_backend_cert_for_another_host_is_refused(
    gateway_factory, ca, pems, names, host, says
) -> None:
    """A certificate the trusted CA signed, but for another name than the URL's host, is a
    502 naming the mismatch."""
    async with https_upstream(ca.issue_cert(*names)) as up:
        url = up.url.replace("127.0.0.1", host)
        gw = await gateway_factory(https_backend(url, pems["ca"]))
        status, body = await chat(gw.url)
        assert 502 == status
        assert says in error_of(body)["message"]
        assert [] == up.posts


async def test_plain_http_backend_at_an_https_url_is_a_clear_502(
    gateway_factory, upstream, pems
) -> None:
    """An https URL pointing at a plain-http server fails the handshake with a 502 saying so."""
    gw = await gateway_factory(https_backend(upstream.url.replace("http:", "https:"), pems["ca"]))
    status, body = await chat(gw.url)
    assert 502 == status
    assert "TLS handshake with backend" in error_of(body)["message"]


async def test_tls_handshake_counts_within_connect_s(pems) -> None:
    """A backend that accepts TCP but never answers the ClientHello is given up after
    timeouts.connect_s, handshake included, and its socket is closed."""
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    backend = Backend("gpu", BackendConfig(url=url, ca_file=pems["ca"]), None, connect_s=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnreachable, match=r"took over 0\.3 s"):
            await send(backend, "GET", b"/health", b"", None)
        took = time.monotonic() - started
        async with asyncio.timeout(2):
            await closed.wait()
    finally:
        backend.close()
        server.close()
        await server.wait_closed()
    assert 0.3 <= took < 1.0


# Files that do not load -----------------------------------------------------------------------


def tls_config_file(tmp_path: Path, cert: str, key: str, ca_file: str) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"server: {{tls: {{cert_file: '{cert}', key_file: '{key}'}}}}\n"
        f"backends:\n  gpu: {{url: 'https://127.0.0.1:9', ca_file: '{ca_file}'}}\n"
    )
    return path


def bad_files(pems: dict[str, str], tmp_path: Path) -> tuple[Path, list[str]]:
    """A config whose cert_file is missing, key_file not PEM and ca_file a key: its errors."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    path = tls_config_file(tmp_path, str(missing), str(junk), pems["key"])
    return path, [
        f"server.tls.cert_file: cannot read '{missing}': No such file or directory",
        f"backends.gpu.ca_file: '{pems['key']}' holds no PEM certificate",
    ]


async def test_bad_files_are_config_errors_at_start(pems, tmp_path) -> None:
    """Every unreadable or non-PEM TLS file is a ConfigError naming its key and path, from
    check_files and from starting the gateway (before it listens)."""
    path, expected = bad_files(pems, tmp_path)
    config = load_config(path.read_bytes())
    with pytest.raises(ConfigError) as caught:
        check_files(config)
    assert expected == caught.value.errors
    with pytest.raises(ConfigError) as caught:
        await serve_app(create_app(config, {}), config, "127.0.0.1", 0)
    assert expected[:1] == caught.value.errors


@pytest.mark.parametrize("check", [True, False], ids=["--check", "start"])
def test_bad_files_are_config_errors_on_the_command_line(pems, tmp_path, check) -> None:
    """`--check` and a start print every TLS file error with its key and path, and exit 2."""
    path, expected = bad_files(pems, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path), "--port", "0"]
        + (["--check"] if check else []),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert 2 == result.returncode
    assert [f"config error: {e}" for e in expected] == [
        line for line in result.stderr.splitlines() if line.startswith("config error:")
    ]


def test_good_files_pass_check(pems, tmp_path) -> None:
    """`--check` passes a config whose TLS files all load."""
    path = tls_config_file(tmp_path, pems["cert"], pems["key"], pems["ca"])
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (0, "config ok\n") == (result.returncode, result.stdout)


def test_readme_tls_example_loads(pems) -> None:
    """The README's TLS example is a valid config whose files, once they exist, all load."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### TLS\n", 1)[1].split("\n## ", 1)[0]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    for name, path in (("cert", pems["cert"]), ("key", pems["key"]), ("gpu-ca", pems["ca"])):
        example = example.replace(f"/etc/inference-proxy/{name}.pem", path)
    config = load_config(example)
    check_files(config)
    assert config.server.tls is not None
    assert (pems["cert"], pems["ca"]) == (
        config.server.tls.cert_file,
        config.backends["gpu-a"].ca_file,
    )


def served_serial(port: int, ca: trustme.CA) -> int:
    """The serial number of the certificate the gateway shows a new handshake."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with trusting(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_sighup_loads_a_renewed_certificate(gateway_factory, upstream, pems, ca) -> None:
    """The same paths with a renewed certificate: a reload makes new handshakes use it; a
    broken file on reload is an error and the certificate in use stays."""
    text = tls_server(pems, upstream.url)
    gw = await gateway_factory(text)
    port = port_of(gw.url)
    live = gw.serving.runner.app[LIVE]
    reloader = Reloader(live, lambda: load_config(text), "proxy.yaml", {})
    first = await asyncio.to_thread(served_serial, port, ca)
    renewed = ca.issue_cert("127.0.0.1", "localhost")
    renewed.private_key_pem.write_to_path(pems["key"])
    for i, pem in enumerate(renewed.cert_chain_pems):
        pem.write_to_path(pems["cert"], append=i > 0)
    assert await reloader.once()
    second = await asyncio.to_thread(served_serial, port, ca)
    assert first != second
    await asyncio.to_thread(Path(pems["cert"]).write_text, "not a certificate\n")
    assert not await reloader.once()
    assert second == await asyncio.to_thread(served_serial, port, ca)
