"""Engine throughput next to the ncnn runtime, in one run on the same inputs and weights.

For each model, input size and CPU method (winograd, direct, bf16, or auto: what the server picks by
measurement on this machine): the median wall time of the whole engine path (tiling included)
against ncnn's CPU runtime on the same official files, the achieved GFLOP/s (FLOPs counted from the
network's convolutions as direct 3x3 convolutions, so for Winograd it is an effective rate) next to
the machine's fp32 peak, and the accuracy cost against ncnn (exact methods) or our exact output (bf16).
Every result names the CPU model and its instruction sets.

    .venv/bin/python -m bench.bench_engine --models x4plus --sizes 128 256 512 --methods auto winograd direct bf16
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.ncnn_reference import NcnnUpscaler, ncnn_files
from upscale_server.config import Settings
from upscale_server.imaging import read_image_file, resize_pixels
from upscale_server.inference.cpu import kernel
from upscale_server.inference.cpu.methods import METHODS, candidates, is_exact
from upscale_server.inference.cpu.tuning import MethodTable, cpu_description, probe_seconds
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.runtime.devices import configure_threads, cpu_has_fast_bf16, tune_cpu_allocator
from upscale_server.inference.weights.loading import LoadedNetwork, load_network
from upscale_server.inference.weights.manifest import load_manifest
from upscale_server.inference.weights.provision import WeightStore

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "tests" / "data" / "photo_grace_hopper.jpg"
MODELS = {"x4plus": "runware:504@1", "animevideov3": "local:realesr-animevideov3@1"}


def conv_flops_per_input_pixel(network: LoadedNetwork) -> float:
    """FLOPs (2 per multiply-add) of every convolution, per input pixel, counted on a probe input."""
    macs = 0

    def count(module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(module, torch.nn.Conv2d)
        kh, kw = module.kernel_size
        per_out = module.in_channels // module.groups * kh * kw
        macs += output.numel() * per_out

    hooks = [m.register_forward_hook(count) for m in network.module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            network.module(torch.zeros(1, 3, 16, 16))
    finally:
        for hook in hooks:
            hook.remove()
    return 2.0 * macs / (16 * 16)


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    run()  # warm-up: allocator, oneDNN primitive cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def ncnn_timed(
    param: Path, weights: Path, image: np.ndarray, repeats: int, threads: int
) -> tuple[float, list[float], np.ndarray]:
    """ncnn's median time, every run, and its output (run in a child process by the caller)."""
    reference = NcnnUpscaler(param, weights, threads=threads)
    median, runs = median_seconds(lambda: reference.upscale(image), repeats)
    return median, runs, reference.upscale(image)


def ncnn_timed_elsewhere(
    param: Path, weights: Path, image: np.ndarray, repeats: int, threads: int
) -> tuple[float, list[float], np.ndarray]:
    """:func:`ncnn_timed` in a fresh process: ncnn keeps gigabytes of blobs after a large input, and
    in our process they would shrink the engine's free-memory tile budget (a 512x512 x4plus input
    would then be tiled, with seams and 1.5x the work, only because the reference ran first)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(ncnn_timed, param, weights, image, repeats, threads).result()


def test_input(size: int) -> np.ndarray:
    photo = read_image_file(PHOTO).pixels
    side = min(photo.shape[:2])
    top = (photo.shape[0] - side) // 2
    square = np.ascontiguousarray(photo[top : top + side, :side])
    return np.ascontiguousarray(resize_pixels(square, size, size).clip(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["auto", "winograd", "direct", "bf16"],
        choices=["auto", *METHODS],
        help="CPU methods to time; auto = what the server picks by measurement (its probe time is reported apart)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = every core")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks-engine.json")
    args = parser.parse_args()

    tune_cpu_allocator()
    configure_threads(args.threads)
    threads = torch.get_num_threads()
    manifest = load_manifest()
    store = WeightStore(Settings().resolved_models_dir())
    device = torch.device("cpu")
    available = candidates("auto", "auto", winograd_ok=kernel.available(), native_bf16=cpu_has_fast_bf16())
    wanted = [m for m in args.methods if m == "auto" or m in available]  # emulated bf16: hours, not a mode
    rows: list[dict[str, object]] = []
    load_before = os.getloadavg()
    for name in args.models:
        spec = manifest.get(MODELS[name])
        network = load_network(store.ensure(spec))
        flops_px = conv_flops_per_input_pixel(network)
        with tempfile.TemporaryDirectory() as scratch:
            # A fresh cache: "auto" measures here, as a server's first start on this machine would.
            table = MethodTable(Path(scratch) / "methods.json", kernel.build_id())
            for size in args.sizes:
                image = test_input(size)
                ncnn_s, ncnn_all, ncnn_out = ncnn_timed_elsewhere(*ncnn_files(spec), image, args.repeats, threads)
                exact: np.ndarray | None = None
                for method in wanted:
                    allowed = available if method == "auto" else (method,)
                    engine = Upscaler(
                        network,
                        device=device,
                        dtype=torch.float32,
                        cpu_methods=allowed,
                        method_table=table if method == "auto" else None,
                    )
                    started = time.perf_counter()
                    chosen = engine.cpu_choice(size, size)
                    probe_s = time.perf_counter() - started
                    out = engine.upscale(image)
                    # Exact methods are compared with the ncnn runtime, bf16 with our own exact output.
                    baseline = ncnn_out if is_exact(chosen.method) or exact is None else exact
                    levels = np.abs(out - baseline) * 255
                    if is_exact(chosen.method) and exact is None:
                        exact = out
                    ours_s, ours_all = median_seconds(lambda e=engine, i=image: e.upscale(i), args.repeats)
                    tflop = flops_px * size * size / 1e12
                    row = {
                        "model": name,
                        "input": f"{size}x{size}",
                        "method": method if method != "auto" else f"auto: {chosen.method}",
                        "probe_s": round(probe_s, 2) if method == "auto" else None,
                        "engine_s": round(ours_s, 4),
                        "engine_runs_s": [round(t, 4) for t in ours_all],
                        "ncnn_s": round(ncnn_s, 4),
                        "ncnn_runs_s": [round(t, 4) for t in ncnn_all],
                        "speedup_vs_ncnn": round(ncnn_s / ours_s, 3),
                        "engine_gflops": round(tflop * 1e3 / ours_s, 1),
                        "output_mpix_s": round((4 * size) ** 2 / 1e6 / ours_s, 3),
                        "diff_vs": "ncnn" if baseline is ncnn_out else "exact",
                        "max_diff_levels": round(float(levels.max()), 3),
                        "mean_diff_levels": round(float(levels.mean()), 4),
                    }
                    rows.append(row)
                    print(json.dumps(row))

    model, flags = cpu_description()
    result = {
        "command": "python -m bench.bench_engine "
        + " ".join(
            [
                "--models",
                *args.models,
                "--sizes",
                *map(str, args.sizes),
                "--methods",
                *args.methods,
                "--repeats",
                str(args.repeats),
            ]
        ),
        "machine": machine_line(threads),
        "cpu": model,
        "cpu_flags": flags,
        "peak_fp32_gflops": peak_fp32_gflops(threads),
        "sgemm_gflops": gemm_gflops(),
        "kernel": kernel.build_id() if kernel.available() else None,
        "load_average_before_after": [load_before, os.getloadavg()],
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}; MKL sgemm reaches {result['sgemm_gflops']} GFLOP/s")
    print(markdown_table(rows))


def machine_line(threads: int) -> str:
    """The CPU model, its relevant instruction sets, threads, fp32 peak, torch and kernel: beside every figure."""
    model, flags = cpu_description()
    peak = peak_fp32_gflops(threads)
    peak_text = f", fp32 FMA peak {peak:.0f} GFLOP/s at the listed clock" if peak else ""
    build = kernel.build_id() if kernel.available() else "no Winograd kernel"
    return f"{model} [{' '.join(flags)}], {threads} threads{peak_text}, torch {torch.__version__}, {build}"


def gemm_gflops() -> float:
    """The best fp32 rate MKL's sgemm reaches here (2048² x 2048²): the practical ceiling of the cores."""
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    best = min(probe_seconds(lambda: torch.mm(a, b)) for _ in range(5))
    return round(2 * 2048**3 / best / 1e9, 1)


def peak_fp32_gflops(threads: int) -> float | None:
    """Two FMA units x SIMD width x 2 FLOPs x clock x threads: the ceiling GFLOP/s are judged against.

    The clock is /proc/cpuinfo's "cpu MHz" (what the hypervisor reports; turbo may run higher)."""
    _, flags = cpu_description()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    try:
        mhz = next(
            float(line.split(":", 1)[1])
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("cpu MHz")
        )
    except (OSError, StopIteration, ValueError):
        return None
    return round(2 * lanes * 2 * mhz / 1e3 * threads, 1)


def markdown_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | input | method | engine (median s) | ncnn (median s) | engine / ncnn speed | "
        "GFLOP/s | output MPix/s | max / mean diff (levels) vs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['method']} | {r['engine_s']} | "
            f"{r['ncnn_s']} | {r['speedup_vs_ncnn']}x | {r['engine_gflops']} | {r['output_mpix_s']} | "
            f"{r['max_diff_levels']} / {r['mean_diff_levels']} vs {r['diff_vs']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
