"""The lock files pin, with hashes, every dependency pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", re.MULTILINE)


def _name(requirement: str) -> str:
    """The normalized project name of a requirement string (PEP 503)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group()).lower()


def _pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / lock).read_text()
    return {_name(name): version for name, version in _PIN.findall(text)}


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for extra in extras:
        names |= {_name(r) for r in project["optional-dependencies"][extra]}
    return names


@pytest.mark.parametrize(
    ("lock", "extras"),
    [("runtime.txt", ()), ("test.txt", ("test",)), ("bench.txt", ("test", "bench"))],
)
def test_every_declared_dependency_is_pinned(lock: str, extras: tuple[str, ...]) -> None:
    """Each dependency of pyproject.toml (and of the extras the lock is for) has an exact pin."""
    assert set() == _declared(*extras) - set(_pins(lock))


@pytest.mark.parametrize("lock", ["runtime.txt", "test.txt", "bench.txt"])
def test_every_pin_carries_hashes(lock: str) -> None:
    """pip installs in hash-checking mode: every pinned line is followed by its hashes."""
    text = (ROOT / "requirements" / lock).read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[-1])
    pinned = [b for b in blocks if _PIN.match(b + "\n")]
    assert pinned
    assert [] == [b.split()[0] for b in pinned if "--hash=sha256:" not in b]


def test_the_locks_agree_on_shared_versions() -> None:
    """runtime, test and bench locks pin the same version of every package they share."""
    runtime, test, bench = _pins("runtime.txt"), _pins("test.txt"), _pins("bench.txt")
    assert {} == {n: (v, test[n]) for n, v in runtime.items() if test.get(n) != v}
    assert {} == {n: (v, bench[n]) for n, v in test.items() if bench.get(n) != v}


def test_the_build_backend_is_locked() -> None:
    """setuptools (the build backend) is pinned, since the package installs without isolation."""
    assert "setuptools" in _pins("test.txt")
    assert "setuptools" in _pins("bench.txt")
