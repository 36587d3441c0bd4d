"""Upscale Server: a self-hosted image upscaler that speaks the Runware API."""

__version__ = "0.1.0"
