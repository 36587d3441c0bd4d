"""The official Real-ESRGAN-ncnn-vulkan model files run by the ncnn runtime (on the CPU).

This is the engine Real-ESRGAN-ncnn-vulkan and Upscayl are built on, fed the very files our
weights are converted from, so it serves twice: the fidelity oracle of the tests
(``tests/test_fidelity_ncnn.py``) and the speed reference of the benchmarks (``bench_engine.py``).
It is not part of the server package. ``ncnn`` is a test dependency, imported only when this is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from upscale_server.inference.weights.manifest import ModelSpec
from upscale_server.inference.weights.ncnn_convert import NcnnGraph, parse_param
from upscale_server.inference.weights.provision import ncnn_package_dir


def ncnn_files(spec: ModelSpec) -> tuple[Path, Path]:
    """The ``.param`` and ``.bin`` files the manifest names for ``spec``, from the installed package."""
    if spec.ncnn is None:
        raise ValueError(f"{spec.id} has no ncnn source in the manifest")
    root = ncnn_package_dir(spec.ncnn.package)
    if root is None:
        raise ValueError(f"the package {spec.ncnn.package} is not installed")
    return root / spec.ncnn.param, root / spec.ncnn.bin


def blob_names(graph: NcnnGraph) -> tuple[str, str]:
    """The graph's input blob (fed by its ``Input`` layer; ``data`` in the Real-ESRGAN files) and its
    output blob (the one no layer consumes; ``output`` in the Real-ESRGAN files)."""
    inputs = [layer.tops[0] for layer in graph.layers if layer.type == "Input"]
    if not inputs:
        raise ValueError("graph has no Input layer")
    consumed = {b for layer in graph.layers for b in layer.bottoms}
    produced = [t for layer in graph.layers for t in layer.tops if t not in consumed]
    if len(produced) != 1:
        raise ValueError(f"graph has {len(produced)} unconsumed blobs, expected one output")
    return inputs[0], produced[0]


class NcnnUpscaler:
    """One loaded ncnn network. Contract as the engine's: float32 H x W x 3 RGB in [0, 1] in, x scale out.

    No tiling: callers pass images that fit in memory, which is what a reference needs.
    """

    def __init__(self, param: Path, weights: Path, *, threads: int) -> None:
        import ncnn

        self._input, self._output = blob_names(parse_param(param))
        self._net: Any = ncnn.Net()
        self._net.opt.use_vulkan_compute = False
        self._net.opt.num_threads = threads
        # fp32 throughout, so a comparison measures our port and not ncnn's reduced-precision paths.
        self._net.opt.use_fp16_storage = False
        self._net.opt.use_fp16_packed = False
        self._net.opt.use_fp16_arithmetic = False
        self._net.opt.use_bf16_storage = False
        if self._net.load_param(str(param)) != 0 or self._net.load_model(str(weights)) != 0:
            raise RuntimeError(f"ncnn could not load {param} / {weights}")
        self._ncnn = ncnn

    def upscale(self, rgb: np.ndarray) -> np.ndarray:
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
        extractor = self._net.create_extractor()
        mat = self._ncnn.Mat(chw)  # wraps chw without copying: chw must outlive the extraction
        extractor.input(self._input, mat)
        status, out = extractor.extract(self._output)
        if status != 0:
            raise RuntimeError(f"ncnn extraction failed with status {status}")
        result = np.array(out, dtype=np.float32, copy=True).transpose(1, 2, 0)
        del chw
        return np.clip(result, 0.0, 1.0)
