"""Every knob is an env var and a CLI flag."""

from __future__ import annotations

import pytest

from app.cli import build_parser
from app.config import Settings
from app.serving import settings_from_args


def test_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQUISERVE_MODELS", "a, b,")
    monkeypatch.setenv("EQUISERVE_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("EQUISERVE_API_KEY", "")
    monkeypatch.setenv("EQUISERVE_CHANNELS_LAST", "false")
    s = Settings()
    assert s.models == ["a", "b"] and s.max_batch_size == 64 and s.api_key is None and not s.channels_last


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQUISERVE_PORT", "9000")
    monkeypatch.setenv("EQUISERVE_MAX_WAIT_MS", "7")
    args = build_parser().parse_args(["serve", "--port", "9100", "--models", "x,y", "--no-warmup"])
    s = settings_from_args(args)
    assert s.port == 9100 and s.models == ["x", "y"] and s.warmup is False and s.max_wait_ms == 7


def test_every_setting_has_a_flag() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
        assert f"EQUISERVE_{name.upper()}" in help_text


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EQUISERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


def test_uvicorn_keeps_idle_connections_longer_than_clients_do() -> None:
    from app.serving import uvicorn_config

    config = uvicorn_config(object(), Settings())
    assert config.timeout_keep_alive == 65 > 5  # httpx drops idle connections after 5 s
    args = build_parser().parse_args(["serve", "--keep-alive-s", "120"])
    assert uvicorn_config(object(), settings_from_args(args)).timeout_keep_alive == 120


# -- task limits: a settings section per task, overridable per model ----------------------------


def test_task_limits_come_from_their_env_section_then_the_old_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.tasks.act.settings import ActLimits
    from app.tasks.translate.settings import TranslateLimits

    assert ActLimits().max_observations == 256
    monkeypatch.setenv("EQUISERVE_MAX_OBSERVATIONS", "12")  # the name before tasks had sections
    assert ActLimits().max_observations == 12
    monkeypatch.setenv("EQUISERVE_ACT_MAX_OBSERVATIONS", "7")  # the section's own name wins
    assert ActLimits().max_observations == 7
    assert ActLimits(max_observations=3).max_observations == 3  # what a model.yaml says wins
    monkeypatch.setenv("EQUISERVE_TRANSLATE_MAX_COMMANDS", "0")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TranslateLimits()


def test_a_model_yaml_overrides_its_task_limits(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from app.errors import ModelLoadError
    from app.tasks import read_spec
    from tests.acttools import write_tiny_agent

    folder = write_tiny_agent(tmp_path)
    monkeypatch.setenv("EQUISERVE_ACT_MAX_OBSERVATIONS", "9")
    assert read_spec(folder).limits.max_observations == 9
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    (folder / "model.yaml").write_text(yaml.safe_dump({**raw, "limits": {"max_observations": 4}}))
    assert read_spec(folder).limits.max_observations == 4
    (folder / "model.yaml").write_text(yaml.safe_dump({**raw, "limits": {"max_commands": 4}}))
    with pytest.raises(ModelLoadError, match=r"unknown limits \['max_commands'\]"):
        read_spec(folder)


def test_every_task_limit_has_a_serve_flag_that_sets_its_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from app.tasks import TASKS, task_limits
    from app.tasks.base import env_names

    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for task in TASKS:
        for name in task_limits(task).model_fields:
            assert f"--{task}-{name.replace('_', '-')}" in help_text
            assert env_names(task_limits(task), name)[0] in help_text
    monkeypatch.delenv("EQUISERVE_CLASSIFY_MAX_IMAGES", raising=False)
    settings_from_args(build_parser().parse_args(["serve", "--classify-max-images", "3"]))
    assert os.environ["EQUISERVE_CLASSIFY_MAX_IMAGES"] == "3"
    monkeypatch.delenv("EQUISERVE_CLASSIFY_MAX_IMAGES")


def test_the_server_binds_loopback_unless_deployed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server started by hand is not reachable from other machines; the deployments open it."""
    import re
    from pathlib import Path

    monkeypatch.delenv("EQUISERVE_HOST", raising=False)
    assert Settings().host == "127.0.0.1"
    root = Path(__file__).resolve().parent.parent
    assert re.search(r"EQUISERVE_HOST=0\.0\.0\.0", (root / "Dockerfile").read_text())
    for manifest in ("equiserve.yaml", "inferenceservice.yaml"):
        text = (root / "deploy" / "kubernetes" / manifest).read_text()
        assert re.search(r"name: EQUISERVE_HOST\s+value: \"?0\.0\.0\.0", text), manifest
