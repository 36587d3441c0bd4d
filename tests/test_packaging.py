"""The package lives beside anyone's code: a unique import name, a wheel holding only it, a plugin that
loads under that name in a project that has its own ``server`` package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def build_wheel(out: Path, env: dict[str, str] | None = None, root: Path = REPO) -> tuple[zipfile.ZipFile, str]:
    """The wheel built from ``root`` (this checkout) with the project's own build backend (no network,
    no torch needed: the build hook compiles the CPU kernel); and the build's stderr."""
    build = "import sys; from hatchling.build import build_wheel; print(build_wheel(sys.argv[1]))"
    process = subprocess.run(
        [sys.executable, "-c", build, str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
    )
    assert process.returncode == 0, process.stderr
    return zipfile.ZipFile(out / process.stdout.strip().splitlines()[-1]), process.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    return build_wheel(tmp_path_factory.mktemp("wheel"))[0]


def _kernel_variants() -> list[str]:
    from upscale_server.inference.cpu import variants

    return [v.filename for v in variants.buildable()]


def test_the_wheel_holds_the_kernel_built_for_its_platform(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    built = {f"upscale_server/inference/cpu/_built/{name}" for name in _kernel_variants()}
    assert built <= names, sorted(names - built)[:5]
    assert {n for n in names if n.endswith(".so")} == built, "only this build's libraries, no leftovers"
    assert all(wheel.getinfo(name).file_size > 1000 for name in built)
    # Native code: a platform wheel (not py3-none-any), and not a pure-Python one.
    assert wheel.filename is not None and not wheel.filename.endswith("-any.whl"), wheel.filename
    assert "Root-Is-Purelib: false" in wheel.read("upscale_server-0.1.0.dist-info/WHEEL").decode()


def test_without_a_c_compiler_the_wheel_still_builds_and_warns(tmp_path: Path) -> None:
    # A copy of the project: a failed build removes the checkout's libraries, which this session uses.
    root = tmp_path / "project"
    shutil.copytree(REPO / "server", root / "server", ignore=shutil.ignore_patterns("_built", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "hatch_build.py", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler")}
    wheel, stderr = build_wheel(tmp_path, env, root)
    assert not [n for n in wheel.namelist() if n.endswith(".so")]
    assert wheel.filename is not None and wheel.filename.endswith("-py3-none-any.whl")
    assert "the Winograd CPU kernel was not built" in stderr and "reinstall" in stderr


def test_the_wheel_holds_one_uniquely_named_package(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"upscale_server", "upscale_server-0.1.0.dist-info"}, tops
    assert "upscale_server/inference/weights/manifest.toml" in names, "the manifest ships as package data"
    assert "upscale_server/inference/cpu/winograd.c" in names, "the CPU kernel's source ships with the code"
    assert {"upscale_server/web/static/index.html", "upscale_server/web/static/playground.js"} <= set(names)
    metadata = wheel.read("upscale_server-0.1.0.dist-info/entry_points.txt").decode()
    assert "upscale-server = upscale_server.cli:main" in metadata
    assert "upscale_server.testing = upscale_server.testing" in metadata


def user_project(root: Path) -> Path:
    """A project of someone else's, with its own ``server`` package and a test that uses both."""
    (root / "server").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    (root / "server" / "__init__.py").write_text("")
    (root / "server" / "app.py").write_text('OWNER = "the user"\n')
    (root / "tests").mkdir()
    (root / "tests" / "test_mine.py").write_text(
        textwrap.dedent(
            """
            import json
            import urllib.request

            import server.app


            def test_my_server_package_is_mine():
                assert server.app.OWNER == "the user"


            def test_the_plugin_fixture_serves(upscale_server):
                request = urllib.request.Request(
                    upscale_server.rest_url,
                    data=json.dumps([{"taskType": "ping", "ping": True}]).encode(),
                    headers={"Authorization": f"Bearer {upscale_server.api_key}", "Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as reply:
                    assert json.load(reply) == {"data": [{"taskType": "ping", "pong": True}]}
            """
        )
    )
    return root


@pytest.mark.parametrize("form", ["pytest", "python -m pytest"])
def test_a_project_with_its_own_server_package(tmp_path: Path, form: str) -> None:
    """Both ways a user starts pytest: the plugin loads (it is registered in every environment the
    package is installed in), the user's ``server`` stays theirs, and the fixture still works."""
    project = user_project(tmp_path / "project")
    start = [str(Path(sys.executable).parent / "pytest")] if form == "pytest" else [sys.executable, "-m", "pytest"]
    argv = [*start, "-q", "-p", "no:cacheprovider"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    process = subprocess.run(argv, cwd=project, capture_output=True, text=True, env=env, check=False, timeout=180)
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-2000:]
    assert "2 passed" in process.stdout
