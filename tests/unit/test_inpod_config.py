"""In-pod mode selection from the environment (ztunnel's and Istio's chart variable names)."""

from pathlib import Path

import pytest

from ztunnel_fast.config import DEFAULT_INPOD_UDS, Config
from ztunnel_fast.errors import ConfigError


@pytest.mark.parametrize("env,inpod", [
    ({}, False),
    ({"INPOD_ENABLED": "true"}, True),  # what Istio's chart sets
    ({"INPOD_ENABLED": "false"}, False),
    ({"INPOD_ENABLED": ""}, False),  # empty = unset
    ({"INPOD_UDS": "/run/cni.sock"}, True),
    ({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/n/sa", "INPOD_ENABLED": "true"}, False),
])
def test_inpod_mode(env, inpod):
    assert Config.from_env(env).inpod is inpod


def test_socket_path():
    assert Config.from_env({"INPOD_ENABLED": "true"}).inpod_socket == DEFAULT_INPOD_UDS == Path(
        "/var/run/ztunnel/ztunnel.sock")
    assert Config.from_env({"INPOD_UDS": "/tmp/z.sock"}).inpod_socket == Path("/tmp/z.sock")


def test_bad_boolean_is_refused():
    with pytest.raises(ConfigError, match="INPOD_ENABLED"):
        Config.from_env({"INPOD_ENABLED": "maybe"})
