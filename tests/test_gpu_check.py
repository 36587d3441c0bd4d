"""bench/gpu_check.py runs end to end on the CPU (--quick) and writes its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_quick_on_the_cpu(tmp_path: Path, provisioned_models_dir: Path) -> None:
    out = tmp_path / "gpu_check.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(out),
            "--weights-dir",
            str(provisioned_models_dir),
        ],
        check=True,
        timeout=480,
        cwd=REPO,
    )
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {
        "environment",
        "fidelity",
        "nonfinite_fallback",
        "out_of_memory",
        "batching",
        "compile",
        "x4plus_512_to_2048",
    }
    assert not sections["environment"]["fastapi_imported"]
    assert report["ok"], {k: v.get("error") for k, v in sections.items() if not v.get("ok")}
