"""The configuration reference is generated from the settings class, so it cannot drift."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.conftest import REPO
from upscale_server.config import Settings, settings_reference


def test_configuration_reference_is_current() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == settings_reference(), "run: python -m upscale_server.config > docs/configuration.md"
    for name in Settings.model_fields:
        assert f"`UPSCALE_{name.upper()}`" in committed


def test_settings_read_the_upscale_prefix(monkeypatch) -> None:
    monkeypatch.setenv("UPSCALE_TILE_SIZE", "128")
    monkeypatch.setenv("UPSCALE_PRECISION", "bf16")
    monkeypatch.setenv("UPSCALE_API_KEYS", '["a", "b"]')
    settings = Settings()
    assert settings.tile_size == 128
    assert settings.precision == "bf16"
    assert settings.api_keys == ["a", "b"]


def test_performance_settings_defaults_and_environment(monkeypatch) -> None:
    defaults = Settings()
    assert (defaults.compile, defaults.batch_window_ms, defaults.max_batch) == (False, 0, 8)
    assert (defaults.worker_concurrency, defaults.encode_workers) == (1, 0)
    assert defaults.resolved_encode_workers() >= 1  # 0 means one per usable core
    monkeypatch.setenv("UPSCALE_COMPILE", "true")
    monkeypatch.setenv("UPSCALE_BATCH_WINDOW_MS", "2.5")
    monkeypatch.setenv("UPSCALE_MAX_BATCH", "16")
    monkeypatch.setenv("UPSCALE_WORKER_CONCURRENCY", "4")
    monkeypatch.setenv("UPSCALE_ENCODE_WORKERS", "3")
    settings = Settings()
    assert (settings.compile, settings.batch_window_ms, settings.max_batch) == (True, 2.5, 16)
    assert (settings.worker_concurrency, settings.resolved_encode_workers()) == (4, 3)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("batch_window_ms", "-1", "greater than or equal to 0"),
        ("batch_window_ms", "5000", "less than or equal to 1000"),
        ("batch_window_ms", "soon", "valid number"),
        ("max_batch", "0", "greater than or equal to 1"),
        ("worker_concurrency", "0", "greater than or equal to 1"),
        ("encode_workers", "-2", "greater than or equal to 0"),
        ("compile", "maybe", "valid boolean"),
    ],
)
def test_bad_performance_settings_name_the_setting_and_the_rule(
    monkeypatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"UPSCALE_{name.upper()}", value)
    with pytest.raises(ValidationError) as info:
        Settings()
    (error,) = info.value.errors()
    assert error["loc"] == (name,)
    assert message in error["msg"]
