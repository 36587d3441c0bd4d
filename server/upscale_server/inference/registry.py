"""The model registry: manifest ids -> ready-to-run upscalers, loaded once and shared.

Loading a network costs seconds (conversion on first use, then reading ~67 MB), so each model is
loaded on first request and kept. A per-model lock lets two threads ask for the same model without
loading it twice, while a slow load of one model does not block the others.

In test-target mode (``engine = "resize"``) every model is served by a
:class:`~upscale_server.inference.engine.resize.ResizeUpscaler` of the model's scale: ids are still checked
against the manifest (so ``invalidModel`` is unchanged), but the weight store is never touched, so a
server starts instantly with an empty models folder.

With ``batch_window_ms`` set, every network shares one
:class:`~upscale_server.inference.runtime.batching.DynamicBatcher` (it keeps items of different networks
and shapes apart), so tiles of concurrent requests can share a pass; :meth:`ModelRegistry.close` stops it.
"""

from __future__ import annotations

import logging
import threading

from upscale_server.config import Settings
from upscale_server.inference.cpu import kernel
from upscale_server.inference.cpu.tuning import MethodTable
from upscale_server.inference.engine.base import ImageUpscaler
from upscale_server.inference.engine.resize import ResizeUpscaler
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.runtime.batching import DynamicBatcher
from upscale_server.inference.runtime.compute import ComputeConfig
from upscale_server.inference.runtime.devices import bind_thread
from upscale_server.inference.weights.loading import load_network
from upscale_server.inference.weights.manifest import Manifest, ModelSpec, load_manifest
from upscale_server.inference.weights.provision import WeightStatus, WeightStore

log = logging.getLogger(__name__)


class ModelRegistry:
    """Owns the manifest, the weight store and the loaded upscalers."""

    def __init__(self, settings: Settings, compute: ComputeConfig, *, manifest: Manifest | None = None) -> None:
        self.settings = settings
        self.manifest = manifest or load_manifest()
        self.store = WeightStore(settings.resolved_models_dir(), allow_download=settings.allow_download)
        self.compute = compute
        self.resize_engine = settings.engine == "resize"
        self._upscalers: dict[str, ImageUpscaler] = {}
        self._locks = {spec.id: threading.Lock() for spec in self.manifest.models}
        #: One batcher for all networks, only when cross-request batching is configured (never for the
        #: resize engine, which has no network to batch).
        self.batcher: DynamicBatcher | None = None
        if self.compute.batch_window_s > 0 and not self.resize_engine:
            device = self.compute.device
            self.batcher = DynamicBatcher(
                window_s=self.compute.batch_window_s,
                max_batch=self.compute.max_batch,
                thread_init=lambda: bind_thread(device),
                timeout_s=settings.batch_timeout_seconds,
            )
        #: The CPU methods measured on this machine, shared by every model (None where nothing is chosen).
        self.method_table: MethodTable | None = None
        if len(compute.cpu_methods) > 1 and not self.resize_engine:
            self.method_table = MethodTable(compute.method_cache, kernel.build_id())

    def close(self) -> None:
        """Stop the batcher (if any): items still waiting in it fail rather than hang. Idempotent."""
        if self.batcher is not None:
            self.batcher.close()

    def spec(self, model_id: str | None) -> ModelSpec:
        """The manifest entry for ``model_id`` (the default model when None), or for the model it is an
        alias of (``model_aliases``); InvalidModelError if unknown."""
        return self.manifest.get(model_id or self.settings.default_model, self.settings.model_aliases)

    def status(self, spec: ModelSpec) -> WeightStatus:
        """Whether ``spec`` can run now. The resize engine runs every model without weights: always ready."""
        if self.resize_engine:
            return WeightStatus(spec, True, None, None, "test-target mode: resize engine, no weights needed")
        return self.store.status(spec)

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._upscalers

    def upscaler(self, spec: ModelSpec) -> ImageUpscaler:
        """The shared upscaler for ``spec``, provisioning and loading its weights on first use.

        In test-target mode a :class:`ResizeUpscaler` of ``spec.scale``, without touching the weight store.
        """
        found = self._upscalers.get(spec.id)
        if found is not None:
            return found
        with self._locks[spec.id]:
            found = self._upscalers.get(spec.id)
            if found is None and self.resize_engine:
                found = ResizeUpscaler(
                    spec.scale,
                    delay_seconds=self.settings.resize_delay_seconds,
                    crash_width=self.settings.resize_crash_width,
                )
                log.info("serving %s (%s) with the resize engine (test-target mode)", spec.id, spec.name)
                self._upscalers[spec.id] = found
            elif found is None:
                path = self.store.ensure(spec)
                network = load_network(path)
                found = Upscaler(
                    network,
                    device=self.compute.device,
                    dtype=self.compute.dtype,
                    tile_size=self.compute.tile_size,
                    tile_overlap=self.compute.tile_overlap,
                    batcher=self.batcher,
                    compile_module=self.compute.compile_module,
                    convolution=self.compute.convolution,
                    cpu_methods=self.compute.cpu_methods or None,
                    method_table=self.method_table,
                )
                log.info("loaded %s (%s) from %s on %s", spec.id, spec.name, path, self.compute.describe())
                if self.method_table is not None:
                    # Before the model counts as loaded (readiness): the first request should not pay it.
                    for choice in found.choose_cpu_methods():
                        log.info("%s: %s", spec.id, choice.describe())
                self._upscalers[spec.id] = found
            return found
