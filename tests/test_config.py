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
