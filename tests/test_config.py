"""The configuration reference is generated from the settings class, so it cannot drift."""

from __future__ import annotations

from server.config import Settings, settings_reference
from tests.conftest import REPO


def test_configuration_reference_is_current() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == settings_reference(), "run: python -m server.config > docs/configuration.md"
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
