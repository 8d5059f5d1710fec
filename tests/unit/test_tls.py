"""proxy/tls.py's contexts from PEM files made in the test, and the config's TLS checks: each
file that does not load is an error naming its key and path, all reported in one run."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from proxy.config import ConfigError, TlsConfig, load_config
from proxy.tls import check_files, client_context, server_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    """PEM files: the CA, a leaf's chain and key, another leaf's key, junk, an empty file."""
    leaf, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "other_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    leaf.cert_chain_pems[0].write_to_path(paths["cert"])
    leaf.private_key_pem.write_to_path(paths["key"])
    other.private_key_pem.write_to_path(paths["other_key"])
    (tmp_path / "junk.pem").write_text("not PEM at all\n")
    (tmp_path / "empty.pem").write_bytes(b"")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    (tmp_path / "encrypted.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    names = ("junk", "empty", "encrypted")
    return {k: str(p) for k, p in paths.items()} | {n: str(tmp_path / f"{n}.pem") for n in names}


def server_errors(cert: str, key: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        server_context(TlsConfig(cert_file=cert, key_file=key))
    return caught.value.errors


def test_server_context_serves_http11_from_tls12(files) -> None:
    """A good chain and key make a server context with TLS 1.2 as its floor and no
    renegotiation."""
    context = server_context(TlsConfig(cert_file=files["cert"], key_file=files["key"]))
    assert ssl.TLSVersion.TLSv1_2 == context.minimum_version
    assert ssl.OP_NO_RENEGOTIATION & context.options
    assert ssl.CERT_NONE == context.verify_mode  # clients prove themselves with keys, not certs


def test_missing_files_are_each_named(files, tmp_path) -> None:
    """A cert_file and a key_file that cannot be read are two errors, each naming its key."""
    cert, key = str(tmp_path / "nope-cert.pem"), str(tmp_path)
    assert [
        f"server.tls.cert_file: cannot read '{cert}': No such file or directory",
        f"server.tls.key_file: cannot read '{key}': Is a directory",
    ] == server_errors(cert, key)


@pytest.mark.parametrize("bad", ["junk", "empty", "key"])
def test_cert_file_without_a_certificate(files, bad) -> None:
    """A cert_file holding no PEM certificate (junk, nothing, a key) is named as such."""
    assert [f"server.tls.cert_file: '{files[bad]}' holds no PEM certificate"] == server_errors(
        files[bad], files["key"]
    )


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("junk", "holds no PEM private key"),
        ("cert", "holds no PEM private key"),
        ("other_key", "is not the private key of the certificate in '{cert}'"),
        ("encrypted", "is encrypted with a passphrase, which the gateway cannot ask for"),
    ],
)
def test_key_file_problems_are_told_apart(files, bad, says) -> None:
    """A key_file that is not a key, is another certificate's key, or is encrypted (never a
    prompt on the terminal) is one error naming the key_file and what is wrong with it."""
    (error,) = server_errors(files["cert"], files[bad])
    assert error.startswith(f"server.tls.key_file: '{files[bad]}' {says.format(**files)}")


def test_client_context_verifies_by_default() -> None:
    """Without a ca_file, a backend's certificate and host name are checked against the
    system's trust store."""
    context = client_context(None)
    assert (ssl.CERT_REQUIRED, True) == (context.verify_mode, context.check_hostname)
    assert ssl.TLSVersion.TLSv1_2 == context.minimum_version


def test_client_context_trusts_only_the_ca_file(files) -> None:
    """With a ca_file, its CA is the one trusted."""
    context = client_context(files["ca"], "backends.gpu.ca_file")
    assert 1 == len(context.get_ca_certs())


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("missing", "cannot read '{path}': No such file or directory"),
        ("junk", "'{path}' holds no PEM certificate"),
    ],
)
def test_bad_ca_file_names_its_key(files, tmp_path, bad, says) -> None:
    """A ca_file that cannot be read or holds no certificate is an error with its key."""
    path = files.get(bad, str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError) as caught:
        client_context(path, "backends.gpu.ca_file")
    assert [f"backends.gpu.ca_file: {says.format(path=path)}"] == caught.value.errors


def test_check_files_reports_every_file_at_once(files) -> None:
    """check_files lists the server's and every backend's file errors in one run, and
    ignores http backends and backends without a ca_file."""
    config = load_config(
        f"server: {{tls: {{cert_file: '{files['junk']}', key_file: '{files['key']}'}}}}\n"
        "backends:\n"
        f"  a: {{url: 'https://a:443', ca_file: '{files['empty']}'}}\n"
        f"  b: {{url: 'https://b:443', ca_file: '{files['ca']}'}}\n"
        "  c: {url: 'https://c:443'}\n"
        "  d: {url: 'http://d:80'}\n"
    )
    with pytest.raises(ConfigError) as caught:
        check_files(config)
    assert [
        f"server.tls.cert_file: '{files['junk']}' holds no PEM certificate",
        f"backends.a.ca_file: '{files['empty']}' holds no PEM certificate",
    ] == caught.value.errors


def test_config_values_checks() -> None:
    """The config's own checks: TLS file names may not be empty, and a ca_file belongs only
    to an https:// backend."""
    with pytest.raises(ConfigError) as caught:
        load_config(
            "server: {tls: {cert_file: '', key_file: ''}}\n"
            "backends:\n"
            "  a: {url: 'http://a:80', ca_file: /etc/ca.pem}\n"
            "  b: {url: 'https://b:443', ca_file: ''}\n"
        )
    assert [
        "server.tls.cert_file: must name a PEM file",
        "server.tls.key_file: must name a PEM file",
        "backends.a.ca_file: only an https:// url is verified with a CA file",
        "backends.b.ca_file: must name a PEM file",
    ] == caught.value.errors


def test_tls_section_needs_both_files() -> None:
    """server.tls without a key_file is a config error naming the missing key."""
    with pytest.raises(ConfigError) as caught:
        load_config("server: {tls: {cert_file: c.pem}}\nbackends: {a: {url: 'http://a'}}\n")
    assert ["server.tls: object missing required field `key_file`"] == caught.value.errors
