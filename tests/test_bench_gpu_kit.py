"""bench/gpu/: the wheels an offline CUDA machine needs to run bench_gpu.py, installed without
dependencies, so the list itself must be complete: every runtime dependency of the package,
and every dependency of each listed wheel, is listed or already on the machine."""

from __future__ import annotations

import re
import subprocess
from importlib import metadata
from pathlib import Path

# packaging comes with pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "bench" / "gpu"
# the GPU machine's Python: markers of a dependency are evaluated for it, not for this one
MACHINE_PYTHON = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kit() -> tuple[dict[str, str], set[str]]:
    """(listed name -> pinned version, names already on the machine)."""
    listed: dict[str, str] = {}
    already: set[str] = set()
    for line in (KIT / "requirements.txt").read_text().splitlines():
        if line.startswith("# already there:"):
            already = {normalized(n) for n in line.split(":", 1)[1].split()}
        elif line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            listed[normalized(name)] = version
    assert listed and already
    return listed, already


def needs(requirements: list[str]) -> set[str]:
    """The names of ``requirements`` that apply on the machine, extras left out."""
    out = set()
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({**MACHINE_PYTHON, "extra": ""}):
            out.add(normalized(requirement.name))
    return out


def test_every_runtime_dependency_is_listed_or_already_there() -> None:
    listed, already = kit()
    missing = needs(metadata.requires("equiserve") or []) - listed.keys() - already
    assert not missing, f"bench/gpu/requirements.txt lacks {sorted(missing)}"
    assert not listed.keys() & already, "a package is both listed and already there"


def test_each_listed_wheel_brings_what_it_needs() -> None:
    """Read off the installed distributions (the same versions, or ones the suite runs with):
    a dependency added by a new release shows up here before it fails on the GPU machine."""
    listed, already = kit()
    for name in listed:
        missing = needs(metadata.requires(name) or []) - listed.keys() - already
        assert not missing, f"{name} needs {sorted(missing)}: add them to bench/gpu/requirements.txt"


def test_the_wheels_folder_is_ignored_and_the_scripts_run() -> None:
    for folder in (".whl", ".whl-ort"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x.whl"], cwd=ROOT)
        assert ignored.returncode == 0, f"{folder}/ must stay out of git (it travels as carried, ignored files)"
    for script in ("fetch-wheels", "run"):
        path = KIT / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
