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
