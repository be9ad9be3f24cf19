"""The container image, really built and run: scripts/build-image, then podman.

Slow: the first build on a machine makes the base image and the wheelhouse (minutes); later ones
reuse them and podman's layer cache (docs/container.md). The build starts with the test session,
in the background (tests/imagebuild.py), and these tests run last. Nothing here skips: a machine that cannot
build or run the image fails these tests, since shipping an image nobody can build is the bug.
scripts/build-image installs podman when run as root; elsewhere it must be installed already.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from imagebuild import IMAGE
from PIL import Image
from skimage import data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 3600  # from nothing: debootstrap, a multi-GB wheelhouse, the image layers
READY_TIMEOUT_S = 600  # the first start exports the ONNX graph into the fresh cache volume
MODEL = "imagenet-effnet-c4"
CAT_LABELS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def dockerfile_arg(name: str) -> str:
    m = re.search(rf'^ARG {name}="([^"]*)"$', (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert m, f"the Dockerfile has no ARG {name}"
    return m.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> str:
    """The image scripts/build-image made; tests/conftest.py started the build with the session."""
    from imagebuild import IMAGE_BUILD, start_build

    build = request.config.stash.get(IMAGE_BUILD, None) or start_build()
    code, output = build.wait(BUILD_TIMEOUT_S)
    assert code == 0, f"scripts/build-image failed ({code}):\n{output}"
    return IMAGE


def test_builder_stage_is_tagged(image: str) -> None:
    """The builder stage (the venv, several GB) carries a tag of its own, so that the build
    that replaces it can remove it instead of leaving an untagged image on the disk."""
    name, _, variant = image.partition(":")
    assert podman("image", "exists", f"{name}-builder:{variant}", check=False).returncode == 0


def test_image_pins_torch_and_carries_the_text_model(image: str) -> None:
    """The tested torch/torchvision pair, CPU-only parts, and every GGUF a model.yaml names."""
    pins = dict(p.split("==") for p in dockerfile_arg("TORCH_PACKAGES").split())
    ggufs = []
    for path in sorted((ROOT / "models").glob("*/model.yaml")):
        options = (yaml.safe_load(path.read_text(encoding="utf-8")).get("backbone") or {}).get("options") or {}
        if "package" in options and "gguf_file" in options:
            ggufs.append(f"{options['package']}/{options['gguf_file']}")
    assert ggufs, "no model.yaml names a GGUF in a package: where did the default text model go?"
    probe = (
        "import importlib.metadata as md, importlib.util as iu, pathlib, sys\n"
        "for name in ('torch', 'torchvision', 'triton'):\n"
        "    try: print(name, md.version(name))\n"
        "    except md.PackageNotFoundError: print(name, '-')\n"
        "for item in sys.argv[1:]:\n"
        "    package, _, file = item.partition('/')\n"
        "    spec = iu.find_spec(package)\n"
        "    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / file if spec else None\n"
        "    print(item, path.stat().st_size if path and path.is_file() else 0)\n"
    )
    out = podman("run", "--rm", "--network", "none", "--no-healthcheck", image, "python", "-c", probe, *ggufs).stdout
    found = dict(line.rsplit(" ", 1) for line in out.splitlines())
    for name, version in pins.items():
        assert found[name].split("+")[0] == version, f"{name} {found[name]} in the image, {version} pinned"
    assert found["triton"] == "-", "the CPU image should leave triton out"
    for item in ggufs:
        assert int(found[item]) > 10_000_000, f"{item} is missing from the image ({found[item]} bytes)"


@pytest.fixture
def container(image: str) -> Iterator[tuple[str, str]]:
    """A running container as the README runs it (read-only, uid 10001, cache volume): (name, base URL)."""
    name = f"equiserve-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    podman("volume", "create", name)
    try:
        podman(
            # podman without systemd runs no HEALTHCHECK (and logs errors trying): poll instead
            "run", "--detach", "--name", name, "--no-healthcheck",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--volume", f"{name}:/home/equiserve/.cache",
            "--publish", f"127.0.0.1:{port}:8000",
            # the image carries the text model (checked above); its dequantisation would only slow this down
            "--env", f"EQUISERVE_MODELS={MODEL}",
            image,
        )  # fmt: skip
        yield name, f"http://127.0.0.1:{port}"
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)
        podman("volume", "rm", "--force", name, check=False)


def wait_ready(name: str, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state != "running":
            logs = podman("logs", name, check=False)
            pytest.fail(f"the container is {state} before it was ready:\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}")
        try:
            status = httpx.get(f"{url}/health/ready", timeout=5).status_code
        except httpx.TransportError:
            status = None
        if status == 200:
            return
        time.sleep(2)
    logs = podman("logs", name, check=False)
    pytest.fail(f"/health/ready answered {status} after {READY_TIMEOUT_S} s:\n{logs.stderr[-4000:]}")


def test_container_becomes_ready_and_classifies(container: tuple[str, str]) -> None:
    name, url = container
    wait_ready(name, url)
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)
    r = httpx.post(
        f"{url}/v1/models/{MODEL}/classify",
        files={"image": ("chelsea.jpg", buf.getvalue(), "image/jpeg")},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]["predictions"][0]
    assert top["label"] in CAT_LABELS, top
    assert 0 < top["score"] <= 1
    # the process runs as the image's user, not root
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
