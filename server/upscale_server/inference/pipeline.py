"""Image-level upscaling: the size rules, model choice and pixel-format handling around the network.

The network only ever sees RGB float arrays. This module turns any :class:`~upscale_server.imaging.Picture`
(gray, alpha, 16-bit) into that form and back, picks the model that produces the requested factor,
and enforces the output-size rule, so the CLI and the API give identical results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from upscale_server.errors import InvalidModelError, InvalidParameterError, InvalidUpscaleFactorError
from upscale_server.imaging import Picture, bleed_transparent_colors, resize_pixels
from upscale_server.inference.engine.base import Progress
from upscale_server.inference.registry import ModelRegistry
from upscale_server.inference.weights.manifest import ModelSpec
from upscale_server.vocabulary import UPSCALE_FACTORS


@dataclass(frozen=True)
class UpscalePlan:
    """What will run for one request: decided before any pixel is touched."""

    factor: int  # the factor the network is run at
    model: ModelSpec  # the network that runs (a native-scale sibling when one is ready)
    source_size: tuple[int, int]  # (width, height) of the picture as given
    input_size: tuple[int, int]  # fed to the network, after any shrink for the output cap
    output_size: tuple[int, int]  # factor x input_size, or the size a megapixel target asked for

    @property
    def shrinks_input(self) -> bool:
        return self.input_size != self.source_size


def served_factors(spec: ModelSpec) -> tuple[int, ...]:
    """The factors ``spec`` serves: up to its largest native one (a smaller factor is its own pass, then a
    high-quality downscale); a larger one would only enlarge the network's output by interpolation.
    Raises InvalidModelError for a restoration model (native scale 1), which does not upscale at all."""
    largest = spec.native_factors[-1]
    if largest < 2:
        raise InvalidModelError(
            f"model {spec.id} is a restoration model (native scale 1): it cleans up images at their own size "
            "and does not upscale; choose an upscaling model",
            parameter="model",
        )
    return tuple(f for f in UPSCALE_FACTORS if f <= largest)


def check_factor(spec: ModelSpec, factor: int, allowed: tuple[int, ...]) -> None:
    """InvalidUpscaleFactorError naming the model and the ``allowed`` factors unless ``factor`` is one."""
    if factor not in allowed:
        raise InvalidUpscaleFactorError(
            f"Invalid value for 'upscaleFactor' parameter. Model {spec.id} takes "
            f"{', '.join(map(str, allowed))}; got {factor}.",
            min=allowed[0],
            max=allowed[-1],
            allowed_values=allowed,
        )


def fit_input_size(width: int, height: int, factor: int, max_side: int) -> tuple[int, int]:
    """The largest input size, aspect kept, whose ``factor`` x output fits in ``max_side`` squared."""
    if width * factor <= max_side and height * factor <= max_side:
        return width, height
    ratio = min(max_side / (width * factor), max_side / (height * factor))
    return max(1, math.floor(width * ratio)), max(1, math.floor(height * ratio))


class UpscalePipeline:
    """Runs upscale requests on pictures. Stateless apart from the shared registry; thread-safe."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def plan(self, width: int, height: int, factor: int, model_id: str | None = None) -> UpscalePlan:
        if factor not in UPSCALE_FACTORS:
            raise InvalidUpscaleFactorError(
                f"upscaleFactor must be one of {', '.join(map(str, UPSCALE_FACTORS))}, got {factor}",
                parameter="upscaleFactor",
            )
        spec = self.registry.spec(model_id)
        check_factor(spec, factor, served_factors(spec))
        in_w, in_h = fit_input_size(width, height, factor, self.registry.settings.max_output_side)
        return UpscalePlan(
            factor=factor,
            model=self._network_for(spec, factor),
            source_size=(width, height),
            input_size=(in_w, in_h),
            output_size=(in_w * factor, in_h * factor),
        )

    def plan_target(self, width: int, height: int, megapixels: float, model_id: str | None = None) -> UpscalePlan:
        """An output of ``megapixels`` million pixels, aspect ratio kept: the network at the smallest of
        its native factors that reaches the target, then a Lanczos resize to the exact size.

        Never shrinks the input the way :meth:`plan` does: a target beyond the model's largest factor or
        the output side cap is an ``invalidTargetMegapixels`` error that states the reachable range."""
        spec = self.registry.spec(model_id)
        served_factors(spec)  # a restoration model is refused here too
        factors = spec.native_factors
        max_side = self.registry.settings.max_output_side
        limit = min(factors[-1], max_side / width, max_side / height)
        scale = math.sqrt(megapixels * 1e6 / (width * height))
        widest, tallest = math.floor(width * limit + 1e-9), math.floor(height * limit + 1e-9)
        if scale > limit * (1 + 1e-9):
            reachable = widest * tallest / 1e6
            raise InvalidParameterError(
                f"Invalid value for 'targetMegapixels' parameter: for this {width}x{height} input it must be "
                f"above 0 and at most {reachable:g} (model {spec.id} upscales at most {factors[-1]}x, and an "
                f"output side is at most {max_side} px); got {megapixels:g}.",
                parameter="targetMegapixels",
                max=reachable,
                type="number",
            )
        factor = next(f for f in factors if f >= scale - 1e-9)
        output = (max(1, min(round(width * scale), widest)), max(1, min(round(height * scale), tallest)))
        return UpscalePlan(
            factor=factor,
            model=self._network_for(spec, factor),
            source_size=(width, height),
            input_size=(width, height),
            output_size=output,
        )

    def _network_for(self, spec: ModelSpec, factor: int) -> ModelSpec:
        """The model that runs ``factor`` for ``spec``: its native-scale sibling when one is ready."""
        if spec.scale != factor and factor in spec.native_scales:
            native = self.registry.spec(spec.native_scales[factor])
            if self.registry.status(native).ready:
                return native
        return spec

    def run(self, picture: Picture, plan: UpscalePlan, *, progress: Progress | None = None) -> Picture:
        """Carry out a plan made by :meth:`plan` for this picture: exactly the plan's factor, gray stays
        gray, alpha and bit depth are kept."""
        pixels = picture.pixels
        if plan.shrinks_input:
            pixels = resize_pixels(pixels, *plan.input_size)
        upscaler = self.registry.upscaler(plan.model)

        channels = pixels.shape[2]
        color = pixels[..., : 3 if channels >= 3 else 1]
        alpha = pixels[..., -1] if channels in (2, 4) else None
        rgb = np.repeat(color, 3, axis=2) if color.shape[2] == 1 else color
        if alpha is not None:
            # Transparent pixels often hide black; the network would smear it into the visible edge.
            rgb = bleed_transparent_colors(np.ascontiguousarray(rgb), alpha)

        rgb = np.ascontiguousarray(rgb, dtype=np.float32)
        out_w, out_h = plan.output_size
        # The engine makes the output size itself (a network's window by window, so the x4 image of a
        # factor-2 request never exists); 8-bit RGB results may come back quantised (the encoders would
        # round them to the same values).
        eight_bit_rgb = picture.bit_depth == 8 and channels == 3
        out = upscaler.upscale(rgb, progress=progress, out_size=(out_w, out_h), quantize_8bit=eight_bit_rgb)
        del rgb

        # Every plane is float32 in [0, 1] already (the engine and resize_pixels clamp, a mean of
        # clamped values stays in range): no clip or copy of the full-size result is needed.
        if color.shape[2] == 1:
            out = out.mean(axis=2, keepdims=True, dtype=np.float32)
        if alpha is not None:
            result = np.empty((out_h, out_w, out.shape[2] + 1), dtype=np.float32)
            result[..., :-1] = out
            del out
            result[..., -1:] = self._upscale_alpha(alpha, out_w, out_h)
            out = result
        return replace(picture, pixels=out)

    @staticmethod
    def _upscale_alpha(alpha: np.ndarray, width: int, height: int) -> np.ndarray:
        """Alpha is resized with Lanczos: smooth edges at a fraction of a second network pass."""
        lo, hi = float(alpha.min()), float(alpha.max())
        if hi - lo < 1e-6:
            return np.full((height, width, 1), lo, dtype=np.float32)
        return resize_pixels(alpha[..., None].astype(np.float32), width, height)
