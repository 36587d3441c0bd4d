"""The error hierarchy. Every failure the project reports is one of these, each with a Runware ``code``.

The CLI prints ``message``; the API (later) turns the same objects into Runware error items, so a
rule about what went wrong lives here once.
"""

from __future__ import annotations


class UpscaleError(Exception):
    """Base class: a failure with a Runware-style code, a human message and the parameter at fault."""

    code = "internalServerError"
    http_status = 500

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter


class InvalidImageError(UpscaleError):
    """The bytes are not an image we can read: empty, corrupt, truncated, or an unsupported format."""

    code = "invalidImage"
    http_status = 400


class ImageTooLargeError(UpscaleError):
    """The image header declares more pixels than the configured budget (checked before decoding)."""

    code = "imageTooLarge"
    http_status = 413


class InvalidModelError(UpscaleError):
    """The requested model id is not in the manifest."""

    code = "invalidModel"
    http_status = 400


class ModelLoadError(UpscaleError):
    """A weight file exists but cannot be used: not a known architecture, wrong keys, unreadable."""

    code = "modelLoadFailed"
    http_status = 500


class ModelUnavailableError(UpscaleError):
    """No source could provide the weights (nothing dropped in, no ncnn package, download not allowed)."""

    code = "modelUnavailable"
    http_status = 503


class InferenceError(UpscaleError):
    """The network failed on this input even after the fallbacks (smaller tiles, fp32)."""

    code = "inferenceError"
    http_status = 500
