"""Config: worker threads derived from the CPU limit the chart passes (ZTUNNEL_CPU_LIMIT,
ZTUNNEL_RESOURCE_CPU_LIMIT), and ZTUNNEL_REDIRECTION (the chart's `redirection: node`)."""

from __future__ import annotations

import pytest

from ztunnel_fast.config import DEFAULT_WORKER_THREADS, Config, parse_cpu_quantity, worker_threads_from_env
from ztunnel_fast.errors import ConfigError


@pytest.mark.parametrize("env, threads", [
    ({}, DEFAULT_WORKER_THREADS),
    ({"ZTUNNEL_WORKER_THREADS": ""}, DEFAULT_WORKER_THREADS),       # Helm's empty value = unset
    ({"ZTUNNEL_CPU_LIMIT": "1"}, 2),                                 # at least ztunnel's default
    ({"ZTUNNEL_CPU_LIMIT": "8"}, 2),
    ({"ZTUNNEL_CPU_LIMIT": "9"}, 3),                                 # a quarter, rounded up
    ({"ZTUNNEL_CPU_LIMIT": "64"}, 16),
    ({"ZTUNNEL_CPU_LIMIT": "64", "ZTUNNEL_RESOURCE_CPU_LIMIT": "500m"}, 1),  # a set limit: ceil, >= 1
    ({"ZTUNNEL_CPU_LIMIT": "2", "ZTUNNEL_RESOURCE_CPU_LIMIT": "1500m"}, 2),
    ({"ZTUNNEL_CPU_LIMIT": "3", "ZTUNNEL_RESOURCE_CPU_LIMIT": "3"}, 3),
    ({"ZTUNNEL_CPU_LIMIT": "64", "ZTUNNEL_RESOURCE_CPU_LIMIT": "4", "ZTUNNEL_WORKER_THREADS": "7"}, 7),
    ({"ZTUNNEL_CPU_LIMIT": "8", "ZTUNNEL_RESOURCE_CPU_REQUEST": "200m"}, 2),  # the chart's default request
    ({"ZTUNNEL_CPU_LIMIT": "8", "ZTUNNEL_RESOURCE_CPU_REQUEST": "3"}, 3),     # requests above 2 raise it
    ({"ZTUNNEL_CPU_LIMIT": "64", "ZTUNNEL_RESOURCE_CPU_REQUEST": "3"}, 16),
    ({"ZTUNNEL_CPU_LIMIT": "8", "ZTUNNEL_WORKER_THREADS": "50%"}, 4),
    ({"ZTUNNEL_CPU_LIMIT": "3", "ZTUNNEL_WORKER_THREADS": "50%"}, 2),         # rounded up
    ({"ZTUNNEL_CPU_LIMIT": "6", "ZTUNNEL_WORKER_THREADS": "0"}, 6),           # 0 = all CPUs
])
def test_worker_threads(env, threads):
    assert worker_threads_from_env(env) == threads
    assert Config.from_env(env).worker_threads == threads


def test_percent_and_zero_without_a_limit_use_the_machine_cpus():
    assert worker_threads_from_env({"ZTUNNEL_WORKER_THREADS": "25%"}, machine_cpus=lambda: 12) == 3
    assert worker_threads_from_env({"ZTUNNEL_WORKER_THREADS": "0"}, machine_cpus=lambda: 12) == 12
    assert worker_threads_from_env({"ZTUNNEL_WORKER_THREADS": "1%"}, machine_cpus=lambda: None) == 1


@pytest.mark.parametrize("text, cpus", [("2", 2.0), ("1.5", 1.5), ("500m", 0.5), (" 250m ", 0.25)])
def test_cpu_quantity(text, cpus):
    assert parse_cpu_quantity("X", text) == cpus


@pytest.mark.parametrize("name, text, reason", [
    ("ZTUNNEL_CPU_LIMIT", "two", "invalid CPU quantity"),
    ("ZTUNNEL_CPU_LIMIT", "0", "greater than zero"),
    ("ZTUNNEL_CPU_LIMIT", "1Gi", "invalid CPU quantity"),
    ("ZTUNNEL_RESOURCE_CPU_LIMIT", "-1", "invalid CPU quantity"),
    ("ZTUNNEL_WORKER_THREADS", "-1", "out of range"),
    ("ZTUNNEL_WORKER_THREADS", "150%", "out of range"),
    ("ZTUNNEL_WORKER_THREADS", "x%", "invalid integer"),
    ("ZTUNNEL_RESOURCE_CPU_REQUEST", "lots", "invalid CPU quantity"),
])
def test_bad_cpu_values_are_refused_with_the_variable_name(name, text, reason):
    with pytest.raises(ConfigError) as err:
        Config.from_env({name: text})
    assert name in str(err.value) and reason in str(err.value)


def test_redirection_default_and_node():
    assert Config.from_env({}).redirection == "none"
    assert Config.from_env({"ZTUNNEL_REDIRECTION": "none"}).redirection == "none"
    assert Config.from_env({"ZTUNNEL_REDIRECTION": "Node", "NODE_NAME": "n1"}).redirection == "node"
    assert Config.from_env({"ZTUNNEL_REDIRECTION": "node", "NODE_NAME": "n1",
                            "INPOD_ENABLED": "false"}).redirection == "node"


@pytest.mark.parametrize("env, reason", [
    ({"ZTUNNEL_REDIRECTION": "inpod"}, "accepted: none, node"),
    ({"ZTUNNEL_REDIRECTION": "node"}, "needs NODE_NAME"),
    ({"ZTUNNEL_REDIRECTION": "node", "NODE_NAME": "n1", "INPOD_ENABLED": "true"}, "conflicts with INPOD_ENABLED"),
    ({"ZTUNNEL_REDIRECTION": "node", "NODE_NAME": "n1", "PROXY_MODE": "dedicated",
      "PROXY_WORKLOAD_INFO": "ns/a/sa"}, "needs PROXY_MODE=shared"),
])
def test_redirection_refusals(env, reason):
    with pytest.raises(ConfigError) as err:
        Config.from_env(env)
    assert "ZTUNNEL_REDIRECTION" in str(err.value) and reason in str(err.value)
