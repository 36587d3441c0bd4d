"""The CPU methods (Winograd, direct, bf16), the choice among them by measurement, and its cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_engine import BadInLowPrecision, TinyNet, image
from upscale_server import cli
from upscale_server.config import Settings
from upscale_server.inference.archs.base import ArchInfo
from upscale_server.inference.archs.srvgg import DESCRIPTOR as SRVGG
from upscale_server.inference.cpu import kernel, methods, tuning
from upscale_server.inference.cpu.methods import CpuMethod
from upscale_server.inference.cpu.tuning import SHAPE_CLASSES, Measure, MethodTable, shape_class
from upscale_server.inference.engine.upscaler import Upscaler
from upscale_server.inference.registry import ModelRegistry
from upscale_server.inference.runtime.compute import ComputeConfig
from upscale_server.inference.weights.loading import LoadedNetwork

CPU = torch.device("cpu")
PHOTO = Path(__file__).resolve().parent / "data" / "photo_grace_hopper.jpg"


@pytest.mark.parametrize(
    ("precision", "convolution", "winograd_ok", "native_bf16", "expected"),
    [
        ("auto", "auto", True, True, ("winograd", "direct", "bf16")),
        ("auto", "auto", True, False, ("winograd", "direct")),  # emulated bf16 is never a candidate
        ("auto", "auto", False, True, ("direct", "bf16")),
        ("fp32", "auto", True, True, ("winograd", "direct")),
        ("fp32", "direct", True, True, ("direct",)),
        ("auto", "winograd", True, True, ("winograd", "bf16")),
        ("bf16", "auto", True, False, ("bf16",)),  # forced: honoured (with a warning elsewhere)
        ("fp32", "winograd", False, False, ()),  # nothing can run: the settings are refused
    ],
)
def test_candidates_follow_the_settings_and_the_machine(
    precision: str, convolution: str, winograd_ok: bool, native_bf16: bool, expected: tuple[str, ...]
) -> None:
    found = methods.candidates(precision, convolution, winograd_ok=winograd_ok, native_bf16=native_bf16)
    assert found == expected


def test_shape_classes_split_at_their_pixel_count() -> None:
    small, large = SHAPE_CLASSES
    assert shape_class(160, 160) == small
    assert shape_class(161, 160) == large
    assert shape_class(1, 1) == small and shape_class(4000, 4000) == large


class FakeTimes:
    """``measure(method, side)`` that returns fixed seconds per method and records its calls."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.calls: list[tuple[str, int]] = []

    def __call__(self, method: CpuMethod, side: int) -> float:
        self.calls.append((method, side))
        return self.seconds[method] * side / 128


def test_the_fastest_method_is_chosen_measured_once_and_cached_per_machine(tmp_path: Path) -> None:
    cache = tmp_path / "methods.json"
    times = FakeTimes({"winograd": 2.0, "direct": 1.5, "bf16": 3.0})
    table = MethodTable(cache, "k1")
    choice = table.choose("net", 100, 100, ("winograd", "direct", "bf16"), times)
    assert (choice.method, choice.reason, choice.shape) == ("direct", "measured", "small")
    assert {m for m, side in times.calls if side == 128} == {"winograd", "direct", "bf16"}
    assert choice.seconds == {"winograd": 2.0, "direct": 1.5, "bf16": 3.0}
    # Again in this process: remembered, no new measurement.
    calls = len(times.calls)
    assert table.choose("net", 90, 120, ("winograd", "direct", "bf16"), times).method == "direct"
    assert len(times.calls) == calls
    # Another process on the same machine reads the file.
    again = MethodTable(cache, "k1").choose("net", 100, 100, ("winograd", "direct", "bf16"), times)
    assert (again.method, again.reason) == ("direct", "cached") and len(times.calls) == calls
    # Another kernel build (or CPU, torch, threads) is another machine: measured again.
    MethodTable(cache, "k2").choose("net", 100, 100, ("winograd", "direct", "bf16"), times)
    assert len(times.calls) > calls
    saved = json.loads(cache.read_text())
    assert len(saved) == 2 and all("k1" in key or "k2" in key for key in saved)
    assert any("CPU" in key or "torch" in key for key in saved)


def test_classes_and_candidate_sets_are_measured_apart(tmp_path: Path) -> None:
    table = MethodTable(tmp_path / "m.json", "k")
    fast_small = FakeTimes({"winograd": 1.0, "direct": 2.0})
    assert table.choose("net", 64, 64, ("winograd", "direct"), fast_small).method == "winograd"
    slow_large = FakeTimes({"winograd": 5.0, "direct": 4.0})
    assert table.choose("net", 512, 512, ("winograd", "direct"), slow_large).method == "direct"
    assert [side for _, side in slow_large.calls if side != 32] == [256, 256]
    only = FakeTimes({})
    assert table.choose("net", 64, 64, ("direct",), only).reason == "only candidate" and not only.calls


def test_an_unreadable_or_unwritable_cache_only_costs_a_measurement(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    times = FakeTimes({"winograd": 1.0, "direct": 2.0})
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.cpu.tuning"):
        assert MethodTable(broken, "k").choose("net", 8, 8, ("winograd", "direct"), times).method == "winograd"
    assert "cannot read" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("")
    table = MethodTable(blocked / "methods.json", "k")  # its parent is a file: nothing can be written
    with caplog.at_level(logging.WARNING, logger="upscale_server.inference.cpu.tuning"):
        assert table.choose("net", 8, 8, ("winograd", "direct"), times).method == "winograd"
    assert "cannot write" in caplog.text


def _tiny_network(module: torch.nn.Module) -> LoadedNetwork:
    return LoadedNetwork(module=module.eval(), arch=SRVGG, info=ArchInfo("SRVGGNetCompact", 2, {}), path=Path("t"))


def _measured_upscaler(module: torch.nn.Module, tmp_path: Path, probe: Measure, **options: Any) -> Upscaler:
    """An upscaler choosing between direct and bf16 by ``probe``'s made-up timings."""
    up = Upscaler(
        _tiny_network(module),
        device=CPU,
        dtype=torch.float32,
        cpu_methods=("direct", "bf16"),
        method_table=MethodTable(tmp_path / "m.json", "k"),
        **options,
    )
    up._probe = probe  # type: ignore[method-assign]
    return up


def test_the_engine_runs_each_window_class_with_its_chosen_method(tmp_path: Path) -> None:
    module = BadInLowPrecision(TinyNet(2), "black")  # counts its bf16 passes
    picks = {"small": "bf16", "large": "direct"}

    def probe(method: CpuMethod, side: int) -> float:
        wanted = picks[shape_class(side, side).name] if side != 32 else method
        return 1.0 if method == wanted else 2.0

    up = _measured_upscaler(module, tmp_path, probe, tile_overlap=4)
    rgb = image(40, 50) * 0.0  # black in, so a black bf16 result is not suspicious
    up.upscale(rgb)
    assert module.low_precision_calls == 1  # the small window ran in bf16
    up.upscale(np.zeros((200, 200, 3), dtype=np.float32))
    assert module.low_precision_calls == 1  # the large one in fp32
    assert [c.method for c in up.choose_cpu_methods()] == ["bf16", "direct"]


def test_a_bad_bf16_window_is_redone_with_the_fastest_exact_method(tmp_path: Path) -> None:
    net = TinyNet(2)
    module = BadInLowPrecision(net, "nan")
    up = _measured_upscaler(module, tmp_path, lambda method, side: 0.5 if method == "bf16" else 1.0)
    rgb = image(24, 24)
    got = up.upscale(rgb)
    assert module.low_precision_calls == 1
    with torch.inference_mode():
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        expected = net(x)[0].permute(1, 2, 0).clamp(0, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_prepacked_bf16_is_the_plain_bf16_network() -> None:
    net = TinyNet(2, seed=4).eval()
    x = torch.rand(2, 3, 23, 17).contiguous(memory_format=torch.channels_last)
    packed = methods.prepacked(net, torch.bfloat16)
    assert all(not isinstance(m, torch.nn.Conv2d) for m in packed.modules())
    assert net.conv1.weight.dtype == torch.float32  # the original is untouched
    with torch.inference_mode():
        plain = net.to(torch.bfloat16)(x.bfloat16()).float()
        ours = packed(x.bfloat16()).float()
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", ["runware:504@1", "local:realesr-animevideov3@1"])
def test_bf16_stays_within_half_a_level_of_exact_on_a_photo(
    model_id: str, load_real_network: Callable[[str], LoadedNetwork], record_property: Callable[[str, object], None]
) -> None:
    torch.set_num_threads(2)
    photo = Image.open(PHOTO).convert("RGB").crop((200, 180, 264, 244))
    rgb = np.ascontiguousarray(np.asarray(photo, dtype=np.float32) / 255.0)
    network = load_real_network(model_id)
    exact = Upscaler(network, device=CPU, dtype=torch.float32, cpu_methods=("direct",)).upscale(rgb)
    fast = Upscaler(network, device=CPU, dtype=torch.float32, cpu_methods=("bf16",)).upscale(rgb)
    levels = np.abs(fast - exact) * 255
    record_property("mean_levels", float(levels.mean()))
    record_property("max_levels", float(levels.max()))
    assert float(levels.mean()) <= 0.5
    assert float(levels.max()) > 0  # it really ran in bf16


@pytest.mark.slow
def test_loading_a_model_measures_its_classes_once(tmp_path: Path, provisioned_models_dir: Path) -> None:
    settings = Settings(
        device="cpu",
        models_dir=provisioned_models_dir,
        precision="fp32",
        cpu_method_cache=tmp_path / "methods.json",
        default_model="local:realesr-animevideov3@1",
    )
    compute = ComputeConfig.from_settings(settings)
    assert compute.cpu_methods == ("winograd", "direct")
    registry = ModelRegistry(settings, compute)
    up = registry.upscaler(registry.spec(None))
    assert isinstance(up, Upscaler)
    saved = json.loads((tmp_path / "methods.json").read_text())
    (entries,) = saved.values()
    assert sorted(key.split(" | ")[1] for key in entries) == ["large", "small"]
    assert all(set(entry["seconds"]) == {"winograd", "direct"} for entry in entries.values())
    again = ModelRegistry(settings, compute)
    reloaded = again.upscaler(again.spec(None))
    assert isinstance(reloaded, Upscaler)
    assert {c.reason for c in reloaded.choose_cpu_methods()} == {"cached"}


def test_doctor_shows_the_machine_and_what_may_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "m.json"
    measured = {
        "method": "direct",
        "shape": "small",
        "probe": 128,
        "seconds": {"winograd": 1.2, "direct": 1.0},
        "reason": "measured",
    }
    torch.set_num_threads(1)  # the key names the thread count; the session restores it after the test
    key = tuning.machine_key(kernel.build_id())
    cache.write_text(json.dumps({key: {"SRVGG x2 {} | small | winograd,direct": measured}}))
    monkeypatch.setenv("UPSCALE_CPU_METHOD_CACHE", str(cache))
    assert cli.main(["doctor", "--device", "cpu", "--precision", "fp32", "--convolution", "direct"]) == 0
    out = capsys.readouterr().out
    assert "CPU: " in out and "torch " in out and "Winograd kernel: " in out
    assert "CPU methods allowed: direct (precision fp32; convolution direct)" in out
    assert cli.main(["doctor", "--device", "cpu", "--precision", "fp32", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "CPU methods allowed: winograd, direct" in out
    assert "SRVGG x2 {}: small windows: direct (measured; 128² probe: direct 1.00 s, winograd 1.20 s)" in out


def test_doctor_refuses_settings_the_machine_cannot_honour(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["doctor", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err
