"""TLS on both legs: the listening socket's context, and each https backend's.

Each context is made once, from the PEM files the config names: the server's when the
gateway starts serving, a backend's when its pool opens. A file that cannot be read or does
not hold what its key says is a `ConfigError` naming that key and the path, and
`check_files` makes every context once to report them all, so `--check` and a start say
the same. ssl's own errors do not say which of two files they are about, so each file is
read and parsed on its own first.
"""

from __future__ import annotations

import ssl

from proxy.config import Config, ConfigError, TlsConfig

# The gateway speaks HTTP/1.1 only, so that is all ALPN may offer (a client told h2 would
# send HTTP/2 frames to an HTTP/1.1 parser).
ALPN = ["http/1.1"]
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def server_context(tls: TlsConfig, key: str = "server.tls") -> ssl.SSLContext:
    """The listening socket's context: the certificate chain and its key, TLS 1.2 or later,
    HTTP/1.1 by ALPN, no renegotiation (a client could make the server pay for each)."""
    errors = _readable(tls.cert_file, f"{key}.cert_file") + _readable(
        tls.key_file, f"{key}.key_file"
    )
    if errors:
        raise ConfigError(errors)
    _parse_certificates(tls.cert_file, f"{key}.cert_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(ALPN)
    context.options |= ssl.OP_NO_RENEGOTIATION
    asked: list[bool] = []

    def no_passphrase() -> bytes:  # else OpenSSL would prompt on the terminal and wait
        asked.append(True)
        return b""

    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=no_passphrase)
    except ssl.SSLError as exc:
        where = f"{key}.key_file: '{tls.key_file}'"
        if asked:
            problem = (
                "is encrypted with a passphrase, which the gateway cannot ask for; "
                "give it an unencrypted key readable only by its own user"
            )
        elif exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"is not the private key of the certificate in '{tls.cert_file}'"
        else:
            problem = "holds no PEM private key"
        raise ConfigError([f"{where} {problem}"]) from None
    except OSError as exc:  # the file went away between the check and the load
        raise ConfigError([f"{key}: cannot load the certificate and key: {exc}"]) from None
    return context


def client_context(ca_file: str | None, key: str = "ca_file") -> ssl.SSLContext:
    """An https backend's context: its certificate and host name verified against the
    system's trust store, or against `ca_file` alone when it is given; TLS 1.2 or later."""
    cadata = None
    if ca_file is not None:
        errors = _readable(ca_file, key)
        if errors:
            raise ConfigError(errors)
        cadata = _parse_certificates(ca_file, key)
    context = ssl.create_default_context(cadata=cadata)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(ALPN)
    return context


def check_files(config: Config) -> None:
    """Make every TLS context the config asks for once; raise `ConfigError` listing every
    file that cannot be read or does not hold what its key says."""
    errors: list[str] = []
    if config.server.tls is not None:
        try:
            server_context(config.server.tls)
        except ConfigError as exc:
            errors.extend(exc.errors)
    for name, backend in config.backends.items():
        if backend.ca_file is not None:
            try:
                client_context(backend.ca_file, f"backends.{name}.ca_file")
            except ConfigError as exc:
                errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)


def _readable(path: str, key: str) -> list[str]:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return [f"{key}: cannot read '{path}': {exc.strerror or exc}"]
    return []


def _parse_certificates(path: str, key: str) -> str:
    """The PEM text of the certificates in `path`; ConfigError when it holds none."""
    try:
        with open(path, "rb") as file:
            text = file.read().decode("latin-1")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):  # no certificate in it: not PEM, a key alone, empty
        raise ConfigError([f"{key}: '{path}' holds no PEM certificate"]) from None
    except OSError as exc:  # ssl.SSLError is one too, hence second
        raise ConfigError([f"{key}: cannot read '{path}': {exc.strerror or exc}"]) from None
    return text
