"""The container image build of tests/test_container.py, started when the session starts.

Building the image from nothing (debootstrap, a multi-GB wheelhouse, the layers) is mostly disk
and unpacking, so it runs in the background at the lowest CPU and I/O priority while the rest of
the suite runs, and tests/test_container.py (moved to the end of the run) waits for it.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "equiserve:cpu"


@dataclass
class ImageBuild:
    process: subprocess.Popen[bytes]
    log: Path

    def wait(self, timeout: float) -> tuple[int, str]:
        """The build's exit status and the tail of its output."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        return code, self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_build() -> ImageBuild:
    log = Path(tempfile.mkstemp(prefix="equiserve-image-build-", suffix=".log")[1])
    command = [str(ROOT / "scripts" / "build-image"), "--variant", "cpu", "--tag", IMAGE]
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["nice", "-n", "19", "ionice", "-c", "3", *command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    return ImageBuild(process, log)


# Where the session's build is kept (tests/conftest.py starts it, test_container.py waits for it).
IMAGE_BUILD = pytest.StashKey[ImageBuild]()
