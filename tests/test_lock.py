"""requirements.lock stays the one source of the environment: it covers every requirement of pyproject.toml
(the runtime and the dev extra), pins each package at one version with at least one hash (pip's
--require-hashes refuses anything else), pins the CPU torch of constraints.txt, and the environment running
these tests is the one it describes. `make lock` rewrites it; README, "Reproducibility"."""

from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# One entry: `name==version \` then its `--hash=sha256:...` lines, up to the next unindented line.
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s+--hash=\S+)*)", re.MULTILINE)
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})\b")


def _lock() -> dict[str, tuple[Version, list[str]]]:
    text = LOCK.read_text(encoding="utf-8")
    entries: dict[str, tuple[Version, list[str]]] = {}
    for name, version, hashes in ENTRY.findall(text):
        key = canonicalize_name(name)
        assert key not in entries, f"requirements.lock: {name} is pinned twice"
        entries[key] = (Version(version), HASH.findall(hashes))
    return entries


@pytest.fixture(scope="module")
def lock() -> dict[str, tuple[Version, list[str]]]:
    assert LOCK.is_file(), "requirements.lock is missing: run `make lock`"
    entries = _lock()
    # Every requirement line is an entry: a line the pattern missed would escape every check below.
    lines = [l for l in LOCK.read_text(encoding="utf-8").splitlines() if l and not l[0].isspace() and l[0] != "#"]
    assert len(lines) == len(entries), f"requirements.lock: {len(lines)} requirement lines, {len(entries)} parsed"
    return entries


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_entry_is_pinned_with_a_hash(lock):
    assert len(lock) > 100, "requirements.lock holds too few packages to be the whole environment"
    unhashed = sorted(name for name, (_, hashes) in lock.items() if not hashes)
    assert not unhashed, f"requirements.lock: no --hash for {unhashed}; pip --require-hashes refuses them"


def test_every_project_requirement_is_locked_within_its_range(lock):
    """A dependency added to pyproject.toml without `make lock` would be missing from every install."""
    problems = []
    for req in _project_requirements():
        key = canonicalize_name(req.name)
        if key not in lock:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(lock[key][0], prereleases=True):
            problems.append(f"{req.name}=={lock[key][0]} is outside pyproject.toml's {req.specifier}")
    assert not problems, "requirements.lock is stale (run `make lock`): " + "; ".join(problems)


def test_torch_is_the_cpu_build_of_constraints_txt(lock):
    lines = (l.split("#")[0].strip() for l in (ROOT / "constraints.txt").read_text().splitlines())
    pins = [Requirement(l) for l in lines if l]
    (torch_pin,) = [r for r in pins if r.name == "torch"]
    version, _ = lock["torch"]
    assert torch_pin.specifier.contains(version), f"locked torch {version} does not match constraints.txt's {torch_pin}"
    assert version.public == "2.13.0" and version.local == "cpu", f"torch must be locked as 2.13.0+cpu, got {version}"


@pytest.mark.skipif(
    os.environ.get("KILN_LOCK", "requirements.lock") == "",
    reason="installed without the lock (make ... LOCK= or CONSTRAINTS=): versions are the resolver's",
)
def test_installed_distributions_are_at_their_locked_versions(lock):
    """The environment running the tests is the lock's: a venv left from before a relock fails here."""
    wrong = []
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonicalize_name(name) in lock:
            locked = lock[canonicalize_name(name)][0]
            if Version(dist.version) != locked:
                wrong.append(f"{name} {dist.version} (locked {locked})")
    assert not wrong, "installed versions differ from requirements.lock (run `make install-dev`): " + ", ".join(
        sorted(wrong)
    )
