"""The offline CLI as a user runs it: a real process, real files, exit codes and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image

ANIME = "local:realesr-animevideov3@1"
#: The CLI's rules (files, names, formats, exit codes) run on the resize engine; one test runs a real model.
RESIZE = ("--engine", "resize")


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "upscale_server", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )


def assert_one_line_errors(stderr: str) -> None:
    assert "Traceback" not in stderr
    for line in stderr.splitlines():
        if "error:" in line:
            assert line.startswith("upscale-server: error:"), line


@pytest.fixture
def small_png(tmp_path: Path, photo_path: Path) -> Path:
    path = tmp_path / "in" / "face.png"
    path.parent.mkdir()
    Image.open(photo_path).crop((220, 200, 252, 224)).save(path)  # 32 x 24
    return path


@pytest.mark.slow  # the real network, through the real CLI
def test_upscales_a_file_into_a_folder(small_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("upscale", small_png, "-o", out, "--model", ANIME, "--scale", "3")
    assert result.returncode == 0, result.stderr
    written = out / "face_x3.png"
    with Image.open(written) as image:
        assert image.size == (96, 72)
        assert image.format == "PNG"
    assert "1 written, 0 failed" in result.stderr


def test_folder_with_bad_files_processes_the_good_ones(small_png: Path, tmp_path: Path, photo_path: Path) -> None:
    folder = small_png.parent
    Image.open(photo_path).crop((0, 0, 20, 16)).save(folder / "second.jpg", quality=90)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "broken.png").write_bytes(small_png.read_bytes()[:200])
    out = tmp_path / "out"
    result = run_cli("upscale", folder, tmp_path / "missing.png", "-o", out, "--model", ANIME, "--scale", "2", *RESIZE)
    assert result.returncode == 1
    assert_one_line_errors(result.stderr)
    for name in ("empty.png", "notes.txt", "broken.png", "missing.png"):
        assert any(name in line for line in result.stderr.splitlines() if "error:" in line), name
    assert sorted(p.name for p in out.iterdir()) == ["face_x2.png", "second_x2.jpg"]
    with Image.open(out / "second_x2.jpg") as image:
        assert image.size == (40, 32) and image.format == "JPEG"
    assert "2 written, 4 failed" in result.stderr


def test_never_overwrites_an_input(small_png: Path) -> None:
    before = small_png.read_bytes()
    result = run_cli("upscale", small_png, "-o", small_png, "--model", ANIME, *RESIZE)
    assert result.returncode == 1
    assert "overwrite" in result.stderr
    assert small_png.read_bytes() == before


def test_format_quality_and_sixteen_bit(tmp_path: Path) -> None:
    rows = (np.arange(24 * 20 * 3).reshape(20, 72) * 57 % 65536).astype(np.uint16)
    source = tmp_path / "deep.png"
    with source.open("wb") as fh:
        png.Writer(24, 20, greyscale=False, bitdepth=16).write(fh, rows.tolist())
    result = run_cli("upscale", source, "-o", tmp_path / "deep_out.png", "--model", ANIME, "--scale", "2", *RESIZE)
    assert result.returncode == 0, result.stderr
    width, height, _, info = png.Reader(filename=str(tmp_path / "deep_out.png")).read()
    assert (width, height, info["bitdepth"]) == (48, 40, 16)

    result = run_cli(
        "upscale", source, "-o", tmp_path / "webp", "--model", ANIME, "--format", "webp", "--quality", "80", *RESIZE
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "webp" / "deep_x4.webp") as image:
        assert image.format == "WEBP" and image.size == (96, 80)


@pytest.mark.parametrize(
    "args",
    [["--scale", "5"], ["--quality", "10"], ["--format", "gif"], ["--threads", "x"]],
)
def test_bad_arguments_exit_2_with_a_message(small_png: Path, tmp_path: Path, args: list[str]) -> None:
    result = run_cli("upscale", small_png, "-o", tmp_path / "o", *args)
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["upscale", "serve"])
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--device", "cuda:7"], "cuda"),  # CPU-only CI has no CUDA
        (["--device", "cpu", "--convolution", "winograd"], "cpu_convolution 'winograd'"),  # kernel not built
    ],
)
def test_settings_this_machine_cannot_honour_exit_2_with_one_line(
    command: str, flags: list[str], named: str, small_png: Path, tmp_path: Path
) -> None:
    result = _run_with(command, flags, small_png, tmp_path)
    assert result.returncode == 2, result.stderr
    assert_one_line_errors(result.stderr)
    assert named in result.stderr
    assert not (tmp_path / "o").exists()


#: Runs the CLI as an install without a built Winograd kernel would (no C compiler at install time).
_WITHOUT_KERNEL = (
    "import runpy, sys, tempfile; from upscale_server.inference.cpu import kernel; "
    "kernel.BUILT_DIR = kernel.Path(tempfile.mkdtemp()); sys.argv[0] = 'upscale-server'; "
    "runpy.run_module('upscale_server', run_name='__main__', alter_sys=True)"
)


def _run_with(command: str, flags: list[str], small_png: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    where = ["upscale", small_png, "-o", tmp_path / "o"] if command == "upscale" else ["serve", "--port", "0"]
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_KERNEL, *map(str, where), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_unknown_model_is_one_line(small_png: Path, tmp_path: Path) -> None:
    result = run_cli("upscale", small_png, "-o", tmp_path / "o", "--model", "runware:1@1")
    assert result.returncode == 1
    assert_one_line_errors(result.stderr)
    assert "runware:504@1" in result.stderr  # the message lists the models that exist


def test_models_lists_every_model_and_its_source() -> None:
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    for model_id in ("runware:504@1", "local:realesrgan-x4plus-anime@1", ANIME, "local:realesrgan-x2plus@1"):
        assert model_id in result.stdout


def test_an_unreadable_api_key_file_stops_serve_with_one_line(tmp_path: Path) -> None:
    """The server must not start without the keys it was told to require."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("UPSCALE_API_KEYS_FILE", str(tmp_path / "no-such-keys.txt"))
        result = run_cli("serve", "--port", "0", "--engine", "resize", "--data-dir", tmp_path / "data")
    assert result.returncode == 2, result.stderr
    assert_one_line_errors(result.stderr)
    assert "api_keys_file" in result.stderr and "no-such-keys.txt" in result.stderr


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        (["--api-key", ""], {}, "blank key"),
        (["--api-key", "good", "--api-key", "  "], {}, "blank key"),
        ([], {"UPSCALE_API_KEYS": ""}, "api_keys"),
        ([], {"UPSCALE_API_KEYS": '[""]'}, "blank key"),
        ([], {"UPSCALE_API_KEYS_FILE": "only-comments.txt"}, "holds no key"),
    ],
)
def test_a_key_setting_without_a_key_stops_serve_with_one_line(
    tmp_path: Path, flags: list[str], env: dict[str, str], named: str
) -> None:
    """Fails closed: a key source that is given but yields no key never starts an open server."""
    (tmp_path / "only-comments.txt").write_text("# the keys go here\n\n   \n")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, str(tmp_path / value) if name.endswith("_FILE") else value)
        result = run_cli("serve", "--port", "0", "--engine", "resize", "--data-dir", tmp_path / "data", *flags)
    assert result.returncode == 2, result.stderr
    assert_one_line_errors(result.stderr)
    assert named in result.stderr
    assert not (tmp_path / "data").exists()


def test_the_api_key_flag_warns_that_a_command_line_is_visible() -> None:
    result = run_cli("serve", "--help")
    assert "UPSCALE_API_KEYS" in result.stdout and "visible to other users" in " ".join(result.stdout.split())
