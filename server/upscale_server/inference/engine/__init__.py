"""The engine: host orchestration of one network over an image (tiling, transfers, precision fallbacks)."""
