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
