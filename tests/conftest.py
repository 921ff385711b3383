"""
What pytest adds to the suite: the guard that keeps the fast loop fast.

The fast loop is C{pytest -m "not integration and not deploy"}: tests that
drive NOVA in memory (C{StringTransport}, C{Clock}, C{iosim}).  A test that
starts a process or opens a real socket belongs to the C{integration} marker
(C{pytestmark = pytest.mark.integration}, or the decorator).  The guard below
fails an unmarked test that does either, so that the fast loop stays fast
and the marker stays true.

Nothing else lives here on purpose: the suite also runs under C{trial}, which
never reads this file, so shared helpers are plain modules
(C{tests/processes.py}, C{tests/strategies.py}, C{tests/pki.py}) and the
C{TestCase} suites use no pytest fixtures.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import settings

from .processes import Postgres

# Address families whose bind/connect reach the network stack: a socketpair
# or a pipe (the reactor's waker) is in-memory and stays allowed.
_REAL_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


@contextmanager
def _watching(seen: list[str]) -> Iterator[None]:
    """Note, in C{seen}, every process started and every socket bound or connected."""
    popen_init = subprocess.Popen.__init__
    originals: dict[str, Callable[..., Any]] = {
        name: getattr(socket.socket, name) for name in ("bind", "connect", "connect_ex")
    }

    def popen(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> None:
        seen.append(f"started a process: {args!r}")
        popen_init(self, args, *rest, **kw)

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def watched(self: socket.socket, address: Any) -> Any:
            if self.family in _REAL_FAMILIES:
                seen.append(f"socket.{name}({address!r})")
            return original(self, address)

        return watched

    subprocess.Popen.__init__ = popen  # type: ignore[method-assign]
    for name in originals:
        setattr(socket.socket, name, wrap(name))
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
        for name, original in originals.items():
            setattr(socket.socket, name, original)


def _guarded(item: pytest.Item) -> Generator[None, Any, None]:
    if item.get_closest_marker("integration") or item.get_closest_marker("deploy"):
        yield
        return
    seen: list[str] = []
    with _watching(seen):
        outcome = yield
    if seen and outcome.excinfo is None:
        pytest.fail(
            f"{item.nodeid} is not marked integration but "
            + "; ".join(dict.fromkeys(seen))
            + ": mark it (pytest.mark.integration) or keep it in memory",
            pytrace=False,
        )


# Fixtures count too: a module-scoped fixture that starts a server runs in
# the setup of the first test that uses it.
pytest_runtest_setup = pytest.hookimpl(hookwrapper=True)(_guarded)
pytest_runtest_call = pytest.hookimpl(hookwrapper=True)(_guarded)


# The fast loop is the edit loop: each Hypothesis property runs a quarter of
# its examples there (at least 10).  Every other run (the full pytest run,
# trial) keeps each test's own budget.
FAST_LOOP_EXAMPLES = 0.25


def _fast_settings(parent: settings) -> settings:
    return settings(parent, max_examples=max(10, int(parent.max_examples * FAST_LOOP_EXAMPLES)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "not integration" not in (config.option.markexpr or ""):
        return
    done: set[int] = set()  # parametrized tests share one function
    for item in items:
        test = getattr(item, "obj", None)
        test = getattr(test, "__func__", test)
        if getattr(test, "is_hypothesis_test", False) and id(test) not in done:
            done.add(id(test))
            own = getattr(test, "_hypothesis_internal_use_settings", None) or settings.default
            assert isinstance(own, settings)
            test._hypothesis_internal_use_settings = _fast_settings(own)  # type: ignore[union-attr]
        case = getattr(item, "cls", None)
        if case is not None and isinstance(getattr(case, "settings", None), settings) and id(case) not in done:
            done.add(id(case))
            case.settings = _fast_settings(case.settings)


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server of the test's own (tests/processes.Postgres: stop and start it to test an outage)."""
    pg = Postgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.remove()
