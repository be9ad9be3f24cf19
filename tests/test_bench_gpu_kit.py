"""bench/gpu/: the wheels an offline CUDA machine needs to run bench_gpu.py, installed without
dependencies, so the list itself must be complete: every runtime dependency of the package,
and every dependency of each listed wheel, is listed or already on the machine. And bench/gpu/run
itself, offline, with small stand-in wheels."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

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


def probe_wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel that installs one empty ``module``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-0.1-py3-none-any.whl"
    info = f"{dist}-0.1.dist-info"
    files = {
        f"{module}/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]))
    return path


@pytest.mark.parametrize("complete", [True, False], ids=["parts-complete", "a-part-missing"])
def test_run_installs_the_wheels_and_joins_the_parts_it_has(tmp_path: Path, complete: bool) -> None:
    """bench/gpu/run offline: the wheels go to SITE; the parts of a cut wheel are joined and
    checked against its sha256, and installed only when complete; the benchmark gets the
    arguments; its log lands in OUT."""
    wheels, parts, site, out = (tmp_path / name for name in ("whl", "ort", "site", "out"))
    probe_wheel(wheels, "kit_probe", "kit_probe")
    cut = probe_wheel(tmp_path / "cut", "onnxruntime_gpu_probe", "ort_probe")
    data = cut.read_bytes()
    parts.mkdir()
    (parts / f"{cut.name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {cut.name}\n")
    half = len(data) // 2
    for i, chunk in enumerate((data[:half], data[half:])):
        if complete or i == 0:
            (parts / f"{cut.name}.part-{i:02d}").write_bytes(chunk)
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(wheels), "ORT_PARTS": str(parts)}
    env.update(SITE=str(site), OUT=str(out))
    run = subprocess.run(
        [str(KIT / "run"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (site / "kit_probe" / "__init__.py").is_file()
    assert (site / "ort_probe").is_dir() == complete
    assert ("onnxruntime-gpu left out" in run.stderr) != complete
    assert "onnxruntime " in run.stdout and "usage: bench_gpu.py" in (out / "bench_gpu.log").read_text()
