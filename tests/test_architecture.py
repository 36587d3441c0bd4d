"""The import rules of docs/architecture.md, checked on the source (parsed, never imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "server" / "upscale_server"

#: Implementations behind the storage, queue and session interfaces: only backends.py builds them
#: (and an implementation may use another of its own package, as the image store uses the database).
IMPLEMENTATIONS = {
    "upscale_server.storage.sqlite",
    "upscale_server.storage.local_images",
    "upscale_server.storage.sqlite_records",
    "upscale_server.queue.local",
    "upscale_server.sessions.local",
    *(
        f"upscale_server.cluster.{name}"
        for name in ("connect", "images", "jobs", "keys", "objects", "records", "scripts", "sessions", "wakeups")
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> Iterator[tuple[str, str]]:
    """(importing module, imported module) for every absolute import inside the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield importer, alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield importer, node.module
                for alias in node.names:  # ``from upscale_server.x import y`` may name a module y
                    yield importer, f"{node.module}.{alias.name}"


def exported(package: str) -> list[str]:
    """The names in ``__all__`` of ``upscale_server.<package>``."""
    tree = ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [ast.literal_eval(element) for element in node.value.elts]  # type: ignore[attr-defined]
    raise AssertionError(f"upscale_server.{package} declares no __all__")


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_only_the_backends_module_names_an_implementation() -> None:
    offenders = [
        (importer, imported)
        for importer, imported in imports()
        if imported in IMPLEMENTATIONS
        and importer != "upscale_server.backends"
        and importer.rpartition(".")[0] != imported.rpartition(".")[0]
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # The wire format knows nothing of what runs the tasks.
        (
            "upscale_server.protocol",
            ("upscale_server.tasks", "upscale_server.api", "upscale_server.storage", "fastapi"),
        ),
        # Inference can be tested and benchmarked alone: no web framework, no tasks, no storage.
        (
            "upscale_server.inference",
            (
                "fastapi",
                "starlette",
                "upscale_server.api",
                "upscale_server.tasks",
                "upscale_server.protocol",
                "upscale_server.storage",
                "upscale_server.queue",
                "upscale_server.sessions",
                "upscale_server.backends",
                "upscale_server.app",
            ),
        ),
        # Storage keeps bytes and records; it does not know tasks, transports or inference.
        ("upscale_server.storage", ("upscale_server.tasks", "upscale_server.api", "upscale_server.inference")),
        # The cluster backends implement the storage, queue and session interfaces: no tasks, no transports.
        ("upscale_server.cluster", ("upscale_server.tasks", "upscale_server.api", "upscale_server.inference")),
        # Tasks never reach back into the transports.
        ("upscale_server.tasks", ("upscale_server.api", "fastapi", "starlette")),
    ],
)
def test_dependencies_flow_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    offenders = [
        (importer, imported)
        for importer, imported in imports()
        if within(importer, layer) and any(within(imported, bad) for bad in forbidden)
    ]
    assert offenders == []


def test_inference_is_used_through_its_face() -> None:
    """Outside inference/, only the package's own exports (the service, its plan and models, the compute
    settings) and, for the ``models`` command, the weights package are imported."""
    face = {"upscale_server.inference"} | {f"upscale_server.inference.{name}" for name in exported("inference")}
    allowed_weights = {"upscale_server.cli": "upscale_server.inference.weights"}
    offenders = []
    for importer, imported in imports():
        if within(importer, "upscale_server.inference") or not within(imported, "upscale_server.inference"):
            continue
        if imported in face:
            continue
        weights = allowed_weights.get(importer)
        if weights is not None and within(imported, weights):
            continue
        offenders.append((importer, imported))
    assert offenders == []


def test_architecture_names_are_compared_only_in_the_descriptors() -> None:
    """What is known about RRDBNet or SRVGGNetCompact lives beside its module, not in string dispatch."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if within(module_name(path), "upscale_server.inference.archs"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in ("RRDBNet", "SRVGGNetCompact"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
