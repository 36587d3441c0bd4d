"""The test lanes: which tests ``scripts/test --fast`` leaves out, and how it splits the rest over the cores.

Loaded by pytest for every run in this checkout (it sits at the root, next to pyproject.toml), before
any test module; it needs nothing but pytest, so it also loads in the SDK's venv where
``tests/test_test_target.py`` runs the documented example.

Markers given here, so that no test has to remember them:

* ``e2e``: every test under ``tests/e2e/`` (real server processes, the official SDKs, a browser);
* ``slow``: every test that asks for the real weights (the ``provisioned_models_dir`` or
  ``load_real_network`` fixtures of ``tests/conftest.py``), besides those marked by hand.

``--shard K/N`` keeps every N-th selected test starting at the K-th (0-based), after ``-m`` and ``-k``
have deselected theirs. The order of collection is the same in every process, so N processes with
K = 0..N-1 run every selected test exactly once between them; ``scripts/test --fast`` runs two.
"""

from __future__ import annotations

from pathlib import Path

import pytest

E2E_ROOT = Path(__file__).resolve().parent / "tests" / "e2e"
#: Fixtures that hand a test the real converted weights (tests/conftest.py).
REAL_WEIGHT_FIXTURES = frozenset({"provisioned_models_dir", "load_real_network"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shard",
        default=None,
        metavar="K/N",
        help="run only every N-th selected test, starting at the K-th (0-based); N runs with K=0..N-1 cover all",
    )


def _shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard wants K/N (e.g. 0/2), not {value!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard {value}: K must be at least 0 and less than N")
    return index, count


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(E2E_ROOT):
            item.add_marker(pytest.mark.e2e)
        if REAL_WEIGHT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    value = config.getoption("--shard")
    if value is not None:
        config.pluginmanager.register(_Sharder(*_shard(value)), "upscale-shard")


class _Sharder:
    def __init__(self, index: int, count: int) -> None:
        self.index, self.count = index, count

    @pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        kept = items[self.index :: self.count]
        dropped = [item for position, item in enumerate(items) if position % self.count != self.index]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept

    def pytest_report_header(self) -> str:
        return f"shard {self.index}/{self.count}: every {self.count}th selected test from the {self.index}th"
