"""Shared pytest fixtures, by section.  Keep each section small and self-contained.

tests/ is a package (rootdir on sys.path), so test modules import helpers as
``from tests.certs import ...`` and ``from tests.interop.envoy import ...``.
"""

from __future__ import annotations

import os
import shutil

import pytest

from ztunnel_fast import netns

# ==================================================================================================
# Section 1: network-namespace harness (tests/e2e, tests/interop)
#
# Every topology gets a unique prefix (ztf-<6 hex>) and is torn down by its fixture, and also by
# ztunnel_fast.netns' atexit/SIGTERM/SIGINT hooks.  Leftovers of crashed earlier runs are removed
# once per session; namespaces owned by a concurrent live run (e.g. another xdist worker) are kept.
# ==================================================================================================


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        removed = netns.cleanup_stale("ztf-")
        if removed:
            print(f"\nremoved stale network namespaces: {' '.join(removed)}")


@pytest.fixture
def topology():
    """A fresh, empty Topology (198.18.0.0/24); always torn down, even if the test fails."""
    topo = netns.Topology()
    try:
        yield topo
    finally:
        topo.teardown()


# ==================================================================================================
# (next sections: engine parametrisation, product processes; added by the lead)
# ==================================================================================================


# ==================================================================================================
# Section 2: engines and product processes
#
# Every end-to-end and interop test runs once per engine: "native" (the Cython extension, which
# must be built on this machine kind: a missing build fails the native run instead of skipping it)
# and "pure" (the pure-Python twin).
# ==================================================================================================

ENGINES = ["native", "pure"]


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    if request.param == "native":
        from ztunnel_fast.engine import native_available

        ok, why = native_available()
        assert ok, f"native engine not built: {why} (run `make build`)"
    return request.param


@pytest.fixture
def lab(topology, engine, tmp_path):
    """A Lab (pods, local CA, local config, ztunnel-fast processes) on a fresh topology."""
    from ztunnel_fast.demo.lab import Lab

    yield Lab(topology, tmp_path, engine=engine, log_level="info")
