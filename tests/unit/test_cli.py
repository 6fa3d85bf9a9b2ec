"""The command line refuses bad configuration before doing anything, with one clear line."""

import subprocess
import sys

import pytest


def run(*args, env=None, timeout=30):
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run([sys.executable, "-m", "ztunnel_fast", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


@pytest.mark.parametrize("yaml_text,needle", [
    ("workloads: [\n", "LOCAL_XDS_PATH="),
    ("workloads:\n- {name: a, namespace: b, workloadIps: [10.0.0.300]}\n", "workloads[0].workloadIps[0]: invalid IP address"),
    ("workloads:\n- {name: a, namespace: b, bogus: 1}\n", "workloads[0].bogus: unknown key"),
    ("services:\n- {name: s, namespace: n, hostname: h, ports: {70000: 80}}\n", "services[0].ports"),
    ("workloads:\n- {uid: x, name: a, namespace: b}\n- {uid: x, name: c, namespace: b}\n", "duplicate"),
])
def test_invalid_local_config_is_refused_at_start(tmp_path, yaml_text, needle):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    res = run("run", "--local-xds-path", str(cfg), "--local-ca-dir", str(tmp_path / "ca"))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ztunnel-fast: error: LOCAL_XDS_PATH={cfg}") and needle in lines[0], lines


def test_flags_mirror_environment_and_override_it(tmp_path):
    res = run("run", "--proxy-mode", "dedicated", env={"PROXY_MODE": "shared"})
    assert res.returncode == 2 and "PROXY_WORKLOAD_INFO: required when PROXY_MODE=dedicated" in res.stderr
    res = run("run", env={"PROXY_MODE": "sideways"})
    assert res.returncode == 2 and "PROXY_MODE" in res.stderr


def test_ca_init_writes_a_root(tmp_path):
    res = run("ca", "init", str(tmp_path / "ca"), "--trust-domain", "example.org")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ca" / "root-cert.pem").exists() and (tmp_path / "ca" / "root-key.pem").stat().st_mode & 0o077 == 0
    again = run("ca", "init", str(tmp_path / "ca"))
    assert again.returncode == 2  # never overwrites a root by accident


class _Recording(dict):
    """An environment that records every variable name Config asks for."""

    def __init__(self):
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)


# Variables Config reads that deliberately have no flag of their own, with the flag that covers them.
NO_OWN_FLAG = {
    "ISTIO_META_CLUSTER_ID": "--cluster-id (it wins over CLUSTER_ID, as Istio's chart sets it)",
    # Set by the kubelet / the chart, never by hand: no flags.
    "KUBERNETES_SERVICE_HOST": "in-cluster defaults of XDS_ADDRESS and CA_ADDRESS",
    "ZTUNNEL_CPU_LIMIT": "--worker-threads",
    "ZTUNNEL_RESOURCE_CPU_LIMIT": "--worker-threads",
    "ZTUNNEL_RESOURCE_CPU_REQUEST": "--worker-threads",
}


def test_every_config_variable_has_a_flag():
    """The README says which variables have flags: all that Config reads, but the listed fallbacks."""
    from ztunnel_fast.cli import RUN_FLAGS
    from ztunnel_fast.config import Config

    env = _Recording()
    Config.from_env(env)
    flagged = {var for _, var, _ in RUN_FLAGS}
    assert env.asked, "Config read no variable through env.get"
    assert env.asked - flagged == set(NO_OWN_FLAG), sorted(env.asked - flagged)
    assert flagged <= env.asked, sorted(flagged - env.asked)  # no flag for a variable nobody reads


@pytest.mark.parametrize("flag,value,needle", [
    ("--connect-timeout", "soon", "CONNECT_TIMEOUT"),
    ("--ipv6-enabled", "maybe", "IPV6_ENABLED"),
    ("--packet-mark", "-1", "PACKET_MARK"),
    ("--termination-grace-period-seconds", "x", "TERMINATION_GRACE_PERIOD_SECONDS"),
])
def test_new_flags_reach_config_validation(flag, value, needle):
    res = run("run", flag, value)
    assert res.returncode == 2 and needle in res.stderr, res.stderr
