from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.helpers.procs import Platform, processes_of, running_platform


@pytest.fixture
def short_tmp() -> Path:
    """A short temporary folder: unix socket paths are limited to ~107 bytes."""
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        yield Path(name)


@pytest.fixture(scope="session")
def platform():
    """One running platform shared by the read-only gateway tests (debug logs on)."""
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        with running_platform(Path(name), FORGELLM_LOGGING_LEVEL="debug") as running:
            yield running


@pytest.fixture
def fresh_platform():
    """A platform of the test's own, for tests that kill or stop things."""
    with tempfile.TemporaryDirectory(prefix="fl-") as name:
        running = Platform(Path(name))
        try:
            yield running
        finally:
            if running.proc is not None:
                running.stop()
            leftover = processes_of(running.home)
            running.kill_everything()
            assert not leftover, f"processes left behind: {leftover}"


def pytest_collection_modifyitems(config, items):
    """Slow tests (end to end on SmolLM2) get 15 minutes instead of the default 2."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(900))


def pytest_sessionfinish(session, exitstatus):
    """Close every ZeroMQ context a failed test left open, before pytest's final garbage
    collection: a context collected with a socket still open blocks in term() forever, and a
    test run that never exits is worse than a failed one. The count is reported, not hidden."""
    import gc

    import zmq

    shared = zmq.Context._instance  # the process-wide context of the blocking clients: expected
    left = [obj for obj in gc.get_objects() if isinstance(obj, zmq.Context) and not obj.closed]
    for ctx in left:
        ctx.destroy(linger=0)
    left = [ctx for ctx in left if ctx is not shared]
    if left:
        session.config.get_terminal_writer().line(f"closed {len(left)} ZeroMQ context(s) left open by tests")
