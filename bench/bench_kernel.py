"""The Winograd kernel's build variants against each other on x4plus's layers, in one run.

Times the RRDBNet Winograd form (x4plus's shape: 23 blocks, 64 features, 32 growth; random weights,
which cost the same as the real ones) on random inputs, each variant in turn for every repeat, and
prints the median per variant and size. Decides whether AVX-512 CPUs get the AVX-512 build by default
(``kernel.PREFER_AVX512``).

    .venv/bin/python -m bench.bench_kernel --sizes 128 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from upscale_server.inference.archs.rrdbnet import RRDBNet, WinogradRRDBNet
from upscale_server.inference.cpu import kernel
from upscale_server.inference.runtime.devices import configure_threads, tune_cpu_allocator


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--variants", nargs="+", default=["avx2", "avx512"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = every core")
    parser.add_argument("--blocks", type=int, default=23, help="RRDB blocks (x4plus has 23)")
    args = parser.parse_args()

    threads = configure_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)
    net = RRDBNet(num_block=args.blocks).eval()
    form = WinogradRRDBNet(net)
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "threads": threads,
                "flags": sorted(kernel.cpu_flags() & {"avx2", "fma", "avx512f", "avx512vl"}),
            }
        )
    )
    for size in args.sizes:
        x = torch.rand(1, 3, size, size)
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        outputs: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for v in args.variants:  # warm-up: loads the library, faults in the buffers
                kernel.load(variant=v)
                outputs[v] = form(x)
            for _ in range(args.repeats):
                for v in args.variants:
                    kernel.load(variant=v)
                    start = time.perf_counter()
                    form(x)
                    times[v].append(time.perf_counter() - start)
        first = outputs[args.variants[0]]
        for v in args.variants:
            print(
                json.dumps(
                    {
                        "size": size,
                        "variant": v,
                        "median_s": round(statistics.median(times[v]), 3),
                        "samples_s": [round(t, 3) for t in times[v]],
                        "max_abs_diff_vs_first": float((outputs[v] - first).abs().max()),
                    }
                )
            )


if __name__ == "__main__":
    main()
