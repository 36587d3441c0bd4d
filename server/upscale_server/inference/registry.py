"""The model registry: model ids -> ready-to-run upscalers, loaded once and shared.

The models are the manifest's and the files dropped into the models folder
(:mod:`~upscale_server.inference.weights.local`, rescanned on every lookup). Loading a network costs
seconds (conversion on first use, then reading ~67 MB), so each model is loaded on first request and
kept, keyed by its weight file's path, mtime and size (a file replaced on disk is loaded again, never
served from the old copy). At most ``max_loaded_models`` stay loaded; the least recently used goes
first. A per-model lock lets two threads ask for the same model without loading it twice, while a slow
load of one model does not block the others.

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
from collections import OrderedDict
from pathlib import Path

from upscale_server.config import Settings
from upscale_server.errors import InvalidModelError
from upscale_server.inference.cpu import kernel
from upscale_server.inference.cpu.tuning import MethodTable
from upscale_server.inference.engine.base import ImageUpscaler
from upscale_server.inference.engine.resize import ResizeUpscaler
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.runtime.batching import DynamicBatcher
from upscale_server.inference.runtime.compute import ComputeConfig
from upscale_server.inference.runtime.devices import bind_thread
from upscale_server.inference.weights.loading import load_network
from upscale_server.inference.weights.local import LocalFile, LocalModels
from upscale_server.inference.weights.manifest import Manifest, ModelSpec, load_manifest
from upscale_server.inference.weights.provision import WeightStatus, WeightStore

log = logging.getLogger(__name__)

#: What a loaded upscaler is kept under: the model id, and its weight file's path, mtime and size.
LoadKey = tuple[str, str, int, int]


class ModelRegistry:
    """Owns the manifest, the weight store and the loaded upscalers."""

    def __init__(self, settings: Settings, compute: ComputeConfig, *, manifest: Manifest | None = None) -> None:
        self.settings = settings
        self.manifest = manifest or load_manifest()
        self.store = WeightStore(settings.resolved_models_dir(), allow_download=settings.allow_download)
        self.local = LocalModels(settings.resolved_models_dir(), self.manifest)
        self.compute = compute
        self.resize_engine = settings.engine == "resize"
        #: Loaded upscalers, least recently used first.
        self._upscalers: OrderedDict[LoadKey, ImageUpscaler] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
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

    def models(self) -> tuple[ModelSpec, ...]:
        """The manifest's models, then the ones dropped into the models folder (rescanned now)."""
        return (*self.manifest.models, *self.local.models())

    def local_files(self) -> tuple[LocalFile, ...]:
        """Every weight file of the models folder the manifest does not name: taken or not, and why."""
        return self.local.scan()

    def spec(self, model_id: str | None) -> ModelSpec:
        """The model ``model_id`` names (the default model when None), or the one it is an alias of
        (``model_aliases``); InvalidModelError listing every id if unknown.

        A manifest id is answered without touching the disk; any other id rescans the models folder
        (a listing and a stat per file), so a file dropped in a moment ago is found."""
        wanted = model_id or self.settings.default_model
        aliases = self.settings.model_aliases
        try:
            return self.manifest.get(wanted, aliases)
        except InvalidModelError:
            return Manifest(self.models(), self.manifest.path).get(wanted, aliases)

    def status(self, spec: ModelSpec) -> WeightStatus:
        """Whether ``spec`` can run now. The resize engine runs every model without weights: always ready."""
        if self.resize_engine:
            return WeightStatus(spec, True, None, None, "test-target mode: resize engine, no weights needed")
        return self.store.status(spec)

    def is_loaded(self, model_id: str) -> bool:
        with self._cache_lock:
            return any(key[0] == model_id for key in self._upscalers)

    def _lock(self, model_id: str) -> threading.Lock:
        with self._cache_lock:
            return self._locks.setdefault(model_id, threading.Lock())

    def _cached(self, key: LoadKey) -> ImageUpscaler | None:
        with self._cache_lock:
            found = self._upscalers.get(key)
            if found is not None:
                self._upscalers.move_to_end(key)
            return found

    def _keep(self, key: LoadKey, upscaler: ImageUpscaler) -> None:
        """Remember ``upscaler``; drop older copies of the same model and, beyond ``max_loaded_models``,
        the least recently used (runs holding one finish with it; its memory goes with the last of them)."""
        with self._cache_lock:
            for stale in [k for k in self._upscalers if k[0] == key[0]]:
                del self._upscalers[stale]
                log.info("unloaded %s: its weight file changed", key[0])
            self._upscalers[key] = upscaler
            while len(self._upscalers) > self.settings.max_loaded_models:
                evicted, _ = self._upscalers.popitem(last=False)
                limit = self.settings.max_loaded_models
                log.info("unloaded %s (least recently used; UPSCALE_MAX_LOADED_MODELS=%d)", evicted[0], limit)

    def upscaler(self, spec: ModelSpec) -> ImageUpscaler:
        """The shared upscaler for ``spec``, provisioning and loading its weights on first use, and again
        when its weight file changed on disk.

        In test-target mode a :class:`ResizeUpscaler` of ``spec.scale``, without touching the weight store.
        """
        if self.resize_engine:
            key: LoadKey = (spec.id, "", 0, 0)
        else:
            path = self.store.ensure(spec)
            stat = path.stat()
            key = (spec.id, str(path), stat.st_mtime_ns, stat.st_size)
        found = self._cached(key)
        if found is not None:
            return found
        with self._lock(spec.id):
            found = self._cached(key)
            if found is None and self.resize_engine:
                found = ResizeUpscaler(
                    spec.scale,
                    delay_seconds=self.settings.resize_delay_seconds,
                    crash_width=self.settings.resize_crash_width,
                )
                log.info("serving %s (%s) with the resize engine (test-target mode)", spec.id, spec.name)
                self._keep(key, found)
            elif found is None:
                network = load_network(Path(key[1]))
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
                self._keep(key, found)
            return found
