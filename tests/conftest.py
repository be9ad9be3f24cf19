"""Shared fixtures (seeding, the ONNX cache, the container build, the tiny model repository);
the helpers tests import are in ``tests/imagetools.py`` and the other ``*tools.py`` modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.imagetools import write_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The container tests go last, and their image builds in the background meanwhile."""
    container = [item for item in items if item.path.name == "test_container.py"]
    if not container or config.option.collectonly:
        return
    items[:] = [item for item in items if item.path.name != "test_container.py"] + container
    from imagebuild import IMAGE_BUILD, start_build

    config.stash[IMAGE_BUILD] = start_build()


def pytest_unconfigure(config: pytest.Config) -> None:
    from imagebuild import IMAGE_BUILD

    build = config.stash.get(IMAGE_BUILD, None)
    if build is not None:
        build.stop()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """ONNX exports go to one cache per test session (servers started as subprocesses too),
    never to the user's ~/.cache."""
    import os

    os.environ.setdefault("EQUISERVE_ONNX_CACHE_DIR", str(tmp_path_factory.mktemp("onnx-cache")))


@pytest.fixture
def tiny_models_dir(tmp_path: Path) -> Path:
    write_tiny_model(tmp_path)
    return tmp_path
