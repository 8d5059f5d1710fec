"""Run nginx as the reference proxy: our own config and prefix, in the foreground, one worker."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.processes import Service, start

TEMPLATE = Path(__file__).with_name("nginx.conf")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def render_config(prefix: Path, port: int, backend_port: int, nofile: int) -> str:
    """bench/nginx.conf with its @@NAME@@ placeholders filled in."""
    values = {
        "PREFIX": str(prefix),
        "PORT": str(port),
        "BACKEND_PORT": str(backend_port),
        "NOFILE": str(nofile),
        "CONNECTIONS": str(max(1024, nofile)),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@@{name}@@", value)
    return text


def start_nginx(
    prefix: Path, port: int, backend_port: int, *, cpu: int | None, nofile: int
) -> Service:
    """Start nginx under `prefix` (config, pid, logs, temp dirs all there); wait until it serves."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed: run bench/ensure_tools.sh")
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)  # the worker may run as an unprivileged user
    conf = prefix / "nginx.conf"
    conf.write_text(render_config(prefix, port, backend_port, nofile))
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return start("nginx", argv, port=port, cpu=cpu, log_dir=prefix, health_path="/health")
