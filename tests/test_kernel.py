"""The Winograd C kernel's build and load logic, with fake compilers: no test compiles it.

The real kernel is built once, before the tests, by ``python -m upscale_server.inference.cpu``
(tests/conftest.py stops the session when it is missing); here a fake ``CC`` either is absent or
"compiles" by copying that prebuilt library, so the cache, the build key and the once-only rules are
exercised in milliseconds.
"""

from __future__ import annotations

import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from upscale_server.inference.cpu import kernel


@dataclass(frozen=True)
class Fresh:
    cache: Path  # the empty cache the kernel is now looked up in
    prebuilt: Path  # the real kernel, built before the session


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Fresh:
    """An empty kernel cache under ``tmp_path`` and a process that has loaded no kernel yet."""
    prebuilt = kernel.shared_object_path()
    assert prebuilt.is_file()
    monkeypatch.setattr(kernel, "_kernel", kernel._KernelState())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Fresh(tmp_path / "cache", prebuilt)


def fake_compiler(folder: Path, prebuilt: Path) -> tuple[Path, Path]:
    """A ``CC`` that logs its arguments and writes ``prebuilt`` to its ``-o`` target; and its log."""
    log = folder / "cc.log"
    script = folder / "fake-cc"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {shlex.quote(str(log))}\n'
        'while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
        f'cp {shlex.quote(str(prebuilt))} "$out"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def test_without_a_compiler_the_kernel_is_unavailable(
    fresh: Fresh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("INFO", logger="upscale_server.inference.cpu.kernel"):
        assert kernel.available() is False
    assert "using direct convolutions" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_the_kernel_is_built_once_into_the_cache(fresh: Fresh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cc, log = fake_compiler(tmp_path, fresh.prebuilt)
    monkeypatch.setenv("CC", str(cc))

    assert kernel.available() is True
    (built,) = fresh.cache.rglob("winograd-*.so")
    assert built == kernel.shared_object_path() and built.read_bytes() == fresh.prebuilt.read_bytes()
    (call,) = log.read_text().splitlines()
    assert str(kernel.SOURCE) in call and "-fopenmp" in call and "-shared" in call
    assert not [p for p in built.parent.iterdir() if p != built]  # the temporary build folder is gone
    stamp = built.stat().st_mtime_ns

    monkeypatch.setattr(kernel, "_kernel", kernel._KernelState())  # a new process
    assert kernel.available() is True
    assert built.stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    assert len(log.read_text().splitlines()) == 1


def test_a_failed_build_is_not_retried(fresh: Fresh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = tmp_path / "cc.log"
    failing = tmp_path / "failing-cc"
    failing.write_text(f'#!/bin/sh\necho called >> {shlex.quote(str(log))}\necho "error: no omp.h" >&2\nexit 1\n')
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(failing))
    for _ in range(2):
        with pytest.raises(OSError, match=r"failing-cc failed: error: no omp\.h"):
            kernel.load()
    assert kernel.available() is False
    assert log.read_text().splitlines() == ["called"]


def test_loading_a_prebuilt_kernel_never_compiles(
    fresh: Fresh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cc, log = fake_compiler(tmp_path, tmp_path / "unused")
    monkeypatch.setenv("CC", str(cc))
    for _ in range(2):
        with pytest.raises(
            OSError, match=r"not built for this machine .* run `python -m upscale_server\.inference\.cpu`"
        ):
            kernel.load(build=False)
    assert not log.exists() and not fresh.cache.exists()
    # Not remembered as a failure: the build command can still build it in this process.
    assert kernel._kernel.error is None


def test_the_build_command_prints_the_library_or_one_line_of_error(
    fresh: Fresh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cc, _ = fake_compiler(tmp_path, fresh.prebuilt)
    monkeypatch.setenv("CC", str(cc))
    assert kernel.main() == 0
    out, err = capsys.readouterr()
    assert out == f"{kernel.shared_object_path()}\n" and err == ""
    monkeypatch.setattr(kernel, "_kernel", kernel._KernelState())  # a new process loads it without building
    assert kernel.load(build=False) is not None

    monkeypatch.setattr(kernel, "_kernel", kernel._KernelState())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert kernel.main() == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("Winograd kernel: ")
