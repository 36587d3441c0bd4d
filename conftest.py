"""The test lanes: which tests ``scripts/test --fast`` leaves out.

Loaded by pytest for every run in this checkout (it sits at the root, next to pyproject.toml), before
any test module; it needs nothing but pytest, so it also loads in the SDK's venv where
``tests/test_test_target.py`` runs the documented example.

Markers given here, so that no test has to remember them:

* ``e2e``: every test under ``tests/e2e/`` and ``tests/cluster/`` (real server processes, Redis and S3,
  the official SDKs, a browser);
* ``slow``: every test that asks for the real weights (the ``provisioned_models_dir`` or
  ``load_real_network`` fixtures of ``tests/conftest.py``), besides those marked by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent / "tests"
E2E_ROOTS = (TESTS / "e2e", TESTS / "cluster")
#: Fixtures that hand a test the real converted weights (tests/conftest.py).
REAL_WEIGHT_FIXTURES = frozenset({"provisioned_models_dir", "load_real_network"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.path.is_relative_to(root) for root in E2E_ROOTS):
            item.add_marker(pytest.mark.e2e)
        if REAL_WEIGHT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster",
        action="store_true",
        help="run the in-process API tests against a two-node cluster on a real Redis and S3 (tests/cluster_mode.py); "
        "tests marked local_only are skipped",
    )
