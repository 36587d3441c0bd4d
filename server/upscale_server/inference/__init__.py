"""Inference: the service the rest of the server calls, and everything behind it (torch, no web framework).

The app, the CLI and the tasks use this face only::

    from upscale_server.inference import ComputeConfig, InferenceService, tune_process

Behind it, split by reason to change: ``archs`` (one descriptor per network architecture),
``weights`` (manifest, provisioning, loading, ncnn conversion), ``engine`` (host orchestration,
tiling, transfers), ``runtime`` (worker, batching, devices, compute settings) and ``cpu`` (the
CPU methods, their measured choice, the Winograd kernel and its primitives); ``doctor`` reports
what the machine offers and what was chosen on it.
"""

from upscale_server.inference.doctor import report as doctor_report
from upscale_server.inference.engine.base import Progress
from upscale_server.inference.pipeline import UpscalePlan
from upscale_server.inference.runtime.compute import ComputeConfig, tune_process
from upscale_server.inference.service import InferenceObserver, InferenceService, ModelInfo
from upscale_server.inference.weights.manifest import check_model_aliases

__all__ = [
    "ComputeConfig",
    "InferenceObserver",
    "InferenceService",
    "ModelInfo",
    "Progress",
    "UpscalePlan",
    "check_model_aliases",
    "doctor_report",
    "tune_process",
]
