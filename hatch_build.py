"""Install-time build of the Winograd CPU kernel (hatchling custom build hook).

The kernel (``server/upscale_server/inference/cpu/winograd.c``) is compiled here, when the package is
built or installed (``pip install .``, ``pip install -e .``, the Docker image build), into
``server/upscale_server/inference/cpu/_built/winograd_<variant>.so``, one library per variant the
loader may pick (``variants.py``). The server itself never runs a compiler. Without a working C
compiler the install still succeeds, with a warning, and the engine reports the kernel unavailable
(direct convolutions) at run time. Needs no network and no torch.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

CPU_PACKAGE = Path("server/upscale_server/inference/cpu")


def _variants_module(root: Path) -> ModuleType:
    """``variants.py`` loaded by path: importing the package would import torch."""
    path = root / CPU_PACKAGE / "variants.py"
    spec = importlib.util.spec_from_file_location("_upscale_kernel_variants", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_kernels(root: Path) -> tuple[list[Path], list[str]]:
    """Compile every variant this machine's architecture has; returns the libraries and the failures.

    Each library is written to a temporary name and renamed into place, so a process that has the
    previous build loaded keeps its mapping intact (rebuilding in place would corrupt it). A variant
    that fails to build loses its previous library too: an older build of another source revision
    must never be loaded.
    """
    variants = _variants_module(root)
    out_dir: Path = variants.BUILT_DIR
    cc = compiler()
    if cc is None:
        for variant in variants.VARIANTS:
            (out_dir / variant.filename).unlink(missing_ok=True)
        return [], ["no C compiler (cc or gcc) on PATH"]
    out_dir.mkdir(parents=True, exist_ok=True)
    built, failures = [], []
    for variant in variants.buildable():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            obj, lib = Path(tmp) / "winograd.o", Path(tmp) / variant.filename
            steps = (
                [cc, *variants.COMPILE_FLAGS, *variant.isa_flags, "-c", str(variants.SOURCE), "-o", str(obj)],
                [cc, *variants.LINK_FLAGS, str(obj), "-o", str(lib)],
            )
            try:
                for step in steps:
                    result = subprocess.run(step, capture_output=True, text=True, check=False, timeout=300)
                    if result.returncode != 0:
                        raise OSError(f"{step[0]} failed: {result.stderr.strip()[-400:]}")
            except (OSError, subprocess.SubprocessError) as exc:
                failures.append(f"{variant.name}: {exc}")
                (out_dir / variant.filename).unlink(missing_ok=True)
                continue
            lib.replace(out_dir / variant.filename)
            built.append(out_dir / variant.filename)
    return built, failures


class KernelBuildHook(BuildHookInterface):
    """Builds the kernel into the package for wheels and editable installs; sdists carry the source."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        built, failures = build_kernels(root)
        for failure in failures:
            self.app.display_warning(
                f"upscale-server: the Winograd CPU kernel was not built ({failure}); "
                "the server will use direct convolutions. Install a C compiler (gcc) and reinstall."
            )
        if not built:
            return
        # Native code inside: the wheel is for this platform only (any Python 3, no ABI: ctypes).
        from packaging.tags import sys_tags

        build_data["pure_python"] = False
        build_data["tag"] = f"py3-none-{next(iter(sys_tags())).platform}"
        if version != "editable":  # an editable install reads _built/ in the source tree itself
            for lib in built:
                build_data["force_include"][str(lib)] = lib.relative_to(root / "server").as_posix()
