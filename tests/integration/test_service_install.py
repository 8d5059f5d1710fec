"""`make install-service` run into a scratch DESTDIR: the tree it makes, a second run, and the unit
as systemd-analyze judges it there. Nothing here touches /etc, /opt or the system's users."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "systemd" / "install.sh"
UNIT_NAME = "inference-proxy.service"
UNIT = Path("etc/systemd/system") / UNIT_NAME
PREFIX = Path("opt/inference-proxy")
CONF = Path("etc/inference-proxy")
# The interpreter this venv was made from: the service venv gets no test extras from ours.
BASE_PYTHON = (
    Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
)

pytestmark = pytest.mark.timeout(300)  # the first test pays for building the service's venv


@dataclass
class Installed:
    root: Path
    output: str  # what the first run printed

    def path(self, relative: Path | str) -> Path:
        return self.root / relative

    @property
    def python(self) -> Path:
        return self.root / PREFIX / ".venv/bin/python"

    @property
    def gateway(self) -> Path:
        return self.root / PREFIX / ".venv/bin/inference-proxy"


def run_script(
    command: str, destdir: Path | None, user: int | None = None
) -> subprocess.CompletedProcess[str]:
    """systemd/install.sh COMMAND with no stdin, as `make install-service` runs it."""
    env = {k: v for k, v in os.environ.items() if k != "DESTDIR"}
    env["PYTHON"] = str(BASE_PYTHON)
    env["BUILD_PYTHON"] = sys.executable
    if destdir is not None:
        env["DESTDIR"] = str(destdir)
    return subprocess.run(
        ["bash", str(SCRIPT), command],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=280,
        user=user, group=user, extra_groups=None if user is None else [],
    )  # fmt: skip


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """ARGS run from /, so that `python -m proxy` cannot find the checkout's package."""
    return subprocess.run(
        [str(a) for a in args], cwd="/", capture_output=True, text=True, timeout=60
    )


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: `make test` installs Debian's systemd package")
    return run("systemd-analyze", *args)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """One install into a scratch root, shared by the module (it builds a real venv)."""
    root = tmp_path_factory.mktemp("destdir")
    result = run_script("install", root)
    assert 0 == result.returncode, result.stdout + result.stderr
    return Installed(root, result.stdout)


def with_base_system(root: Path) -> Path:
    """Give the scratch root what a real one has besides our files: systemd's own units (every
    service's default dependencies name sysinit.target) and /bin/kill, the unit's ExecReload."""
    units = root / "usr/lib/systemd/system"
    if not units.exists():
        shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2("/bin/kill", root / "usr/bin/kill")
        (root / "bin").symlink_to("usr/bin")  # Debian's merged /usr
    return root


def test_install_makes_the_service_tree(installed: Installed) -> None:
    """The venv, the config, the keys file (0600), the README and the unit land under DESTDIR,
    and the run says what it skipped on the running system."""
    assert "inference-proxy 0.1.0\n" == run(installed.python, "-m", "proxy", "--version").stdout
    assert (ROOT / "conf/proxy.yaml").read_bytes() == installed.path(
        CONF / "proxy.yaml"
    ).read_bytes()
    assert (ROOT / "README.md").read_bytes() == installed.path(PREFIX / "README.md").read_bytes()
    assert (ROOT / "systemd" / UNIT_NAME).read_bytes() == installed.path(UNIT).read_bytes()
    env = installed.path(CONF / "env")
    assert 0o600 == stat.S_IMODE(env.stat().st_mode)
    assert all(line.startswith("#") for line in env.read_text().splitlines())
    assert "DESTDIR is set: not creating the system user inference-proxy" in installed.output
    assert "DESTDIR is set: skipped systemctl daemon-reload" in installed.output


def test_venv_holds_the_runtime_lock_and_the_built_package(installed: Installed) -> None:
    """No test extras, no editable install: the runtime lock's packages and a wheel of ours."""
    names = run(
        installed.python, "-c",
        "import importlib.metadata as m; print(*{d.metadata['Name'] for d in m.distributions()})",
    ).stdout.split()  # fmt: skip
    locked = re.findall(
        r"^([A-Za-z0-9._-]+)==", (ROOT / "requirements/runtime.txt").read_text(), re.M
    )

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    expected = {canonical(n) for n in locked} | {"inference-proxy"}
    assert expected == {canonical(n) for n in names} - {"pip", "setuptools"}
    where = run(installed.python, "-c", "import proxy; print(proxy.__file__)").stdout
    assert where.startswith(str(installed.root / PREFIX / ".venv/lib/"))


def test_installed_gateway_checks_the_installed_config(installed: Installed) -> None:
    """The installed entry point, as ExecStartPre runs it, accepts /etc/inference-proxy/proxy.yaml."""
    result = run(installed.gateway, "--config", installed.path(CONF / "proxy.yaml"), "--check")
    assert (0, "config ok\n") == (result.returncode, result.stdout)


def test_second_run_keeps_config_and_keys(installed: Installed) -> None:
    """Run again over an edited config and keys file: both are kept (the keys file made 0600
    again), the venv is reused, and the tree is the same as after the first run."""
    config, env = installed.path(CONF / "proxy.yaml"), installed.path(CONF / "env")
    edited = config.read_text().replace("port: 8000 ", "port: 8010 ") + "# edited by the operator\n"
    config.write_text(edited)
    env.write_text("API_KEYS=sk-operator\n")
    env.chmod(0o644)
    before = tree(installed.root)
    result = run_script("install", installed.root)
    assert 0 == result.returncode, result.stdout + result.stderr
    assert edited == config.read_text()
    assert "API_KEYS=sk-operator\n" == env.read_text()
    assert 0o600 == stat.S_IMODE(env.stat().st_mode)
    assert f"kept {config}" in result.stdout
    assert f"kept {env}" in result.stdout
    assert f"venv {installed.root / PREFIX / '.venv'} exists" in result.stdout
    assert before == tree(installed.root)
    check = run(installed.gateway, "--config", config, "--check")
    assert (0, "config ok\n") == (check.returncode, check.stdout)


def test_systemd_analyze_verify_passes_on_the_installed_tree(installed: Installed) -> None:
    """`systemd-analyze verify --root` finds every command the unit runs and no bad setting (it
    exits 0 even on an unknown key, so its warnings are read too)."""
    root = with_base_system(installed.root)
    result = analyze("verify", f"--root={root}", UNIT_NAME)
    assert (0, []) == (
        result.returncode,
        [line for line in result.stderr.splitlines() if "inference-proxy" in line],
    )


def test_systemd_analyze_security_exposure_is_at_most_2(installed: Installed) -> None:
    """`systemd-analyze security` rates the installed unit's exposure 2.0 or lower (the old 3.7)."""
    result = analyze("security", "--offline=yes", f"--root={installed.root}", UNIT_NAME)
    assert 0 == result.returncode, result.stderr
    found = re.search(rf"Overall exposure level for {UNIT_NAME}: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout
    assert float(found.group(1)) <= 2.0, result.stdout


MDWE_THEN_CHECK = """
import ctypes, importlib, os, sys
from pathlib import Path
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"skip: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
site = Path(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
for so in sorted(site.rglob("*.so")):
    importlib.import_module(".".join(so.relative_to(site).with_suffix("").with_suffix("").parts))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_compiled_extensions_run_without_writable_executable_memory(installed: Installed) -> None:
    """MemoryDenyWriteExecute=yes is safe: under the kernel's MDWE (no W+X mapping, no mapping
    made executable), every extension module in the venv imports and the gateway runs --check."""
    config = installed.path(CONF / "proxy.yaml")
    result = run(
        installed.python, "-c", MDWE_THEN_CHECK, installed.gateway, "--config", config, "--check"
    )
    if result.returncode != 0 and result.stderr.startswith("skip:"):
        pytest.skip(result.stderr.strip())
    assert (0, "config ok\n") == (result.returncode, result.stdout), result.stderr


def test_refuses_without_root_and_destdir() -> None:
    """Run by a user other than root with no DESTDIR, the script stops at once and says why."""
    nobody = 65534 if os.geteuid() == 0 else None  # root runs it as nobody
    result = run_script("install", None, user=nobody)
    assert 1 == result.returncode
    assert (
        "inference-proxy: error: run as root (sudo make install-service), or set DESTDIR=DIR"
        " to install into a scratch tree\n"
    ) == result.stderr
    assert "" == result.stdout


def test_uninstall_removes_the_unit_and_venv_and_keeps_config(tmp_path: Path) -> None:
    """`make uninstall-service` removes the unit and /opt/inference-proxy, keeps
    /etc/inference-proxy, and says what it kept."""
    for relative in (UNIT, PREFIX / ".venv/bin/python", CONF / "proxy.yaml", CONF / "env"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x\n")
    result = run_script("uninstall", tmp_path)
    assert 0 == result.returncode, result.stderr
    assert ["etc/inference-proxy/env", "etc/inference-proxy/proxy.yaml"] == [
        p for p in tree(tmp_path) if (tmp_path / p).is_file()
    ]
    assert not (tmp_path / PREFIX).exists()
    assert f"kept {tmp_path / CONF} (config and keys) and the system user" in result.stdout
