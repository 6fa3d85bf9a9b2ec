"""L4 authorization, Istio telemetry, admin, readiness and graceful drain, end to end.

Two mesh pods (sleep -> httpbin, one ztunnel-fast each) plus a non-mesh `legacy` pod for
plaintext; policies come from the local config file, which ztunnel-fast watches, so a policy
change applies live.  Runs on both engines.
"""

from __future__ import annotations

import json
import signal
import time

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_fast import netns

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
DENY_SLEEP = {"name": "deny-sleep", "namespace": "demo", "scope": "Namespace", "action": "Deny",
              "rules": [[[{"principals": [{"Exact": "cluster.local/ns/demo/sa/sleep"}]}]]]}
STRICT = {"name": "istio_converted_static_strict", "namespace": "istio-system", "scope": "Global",
          "action": "Deny", "rules": [[[{"notPrincipals": ["Presence"]}]]]}


def mesh(lab, policies=(), **zt_env):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    legacy = lab.pod("legacy", namespace="demo", mesh=False)
    lab.write_config()
    set_policies(lab, policies)
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a, **zt_env)
    zb = lab.start_ztunnel(b, redirect=False, **zt_env)
    netns.redirect_inbound_plaintext(b.pod)
    return a, b, legacy, za, zb


def set_policies(lab, policies):
    cfg = yaml.safe_load(lab.config_path.read_text())
    cfg["policies"] = list(policies)
    lab.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def app_accepts(lab, pod="httpbin"):
    return [line for line in (lab.workdir / f"app-{pod}.log").read_text().splitlines() if line.startswith("accepted")]


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(lab, pod):
    status, body = lab.http(pod, "http://127.0.0.1:15020/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body)}


def samples(families, name, **labels):
    fam = families[name.removesuffix("_total")]
    return [s for s in fam.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def total(families, name, **labels):
    return sum(s.value for s in samples(families, name, **labels))


def test_deny_policy_blocks_hbone_before_the_app(lab):
    a, b, legacy, za, zb = mesh(lab, [DENY_SLEEP])
    out = lab.client(a, "echo", b.ip, "80", "--size", "1024")
    assert not out["ok"] and out.get("received", 0) == 0, out
    assert app_accepts(lab) == []  # the upstream was never dialled
    assert any("http status: 401 Unauthorized" in line for line in za.lines("failed dur="))
    denied = wait_for(lambda: zb.lines("connection complete"), what="access log")
    assert "error=\"connection closed due to policy rejection: explicitly denied by: demo/deny-sleep\"" in denied[0]
    assert " ERROR " in denied[0] and "direction=inbound" in denied[0]
    fams = metrics(lab, b)
    assert total(fams, "istio_tcp_connections_closed_total", reporter="destination", response_flags="DENY") == 1
    assert total(fams, "istio_tcp_connections_failed_total", reporter="destination", response_flags="DENY") == 1
    # other workloads are not affected: plaintext from legacy still reaches the app (PERMISSIVE)
    assert lab.client(legacy, "echo", b.ip, "80", "--size", "1024")["ok"]


def test_strict_blocks_plaintext_but_not_hbone(lab):
    a, b, legacy, za, zb = mesh(lab, [STRICT])
    plain = lab.client(legacy, "echo", b.ip, "80", "--size", "1024")
    assert not plain["ok"] and plain.get("received", 0) == 0
    assert app_accepts(lab) == []
    assert lab.client(a, "echo", b.ip, "80", "--size", "1024")["ok"]
    assert len(app_accepts(lab)) == 1
    assert any("connection closed due to policy rejection" in line for line in zb.lines("failed dur="))


def test_live_policy_change_closes_a_now_denied_connection(lab):
    a, b, legacy, za, zb = mesh(lab, [])
    proc, out_path = lab.client_background(a, "hold", b.ip, "80", "--seconds", "30")
    wait_for(lambda: "established" in out_path.read_text(), what="established tunnel")
    set_policies(lab, [DENY_SLEEP])
    proc.wait(timeout=30)
    result = json.loads(out_path.read_text().strip().splitlines()[-1])
    # ended by the policy change ("reset"/"eof"), not by the client's 30 s hold running out ("timeout")
    assert result["ended"] in ("reset", "eof"), result
    assert zb.lines("connection closed because it's no longer allowed after a policy update")
    assert any("connection closed due to policy change" in line for line in zb.lines("connection complete"))
    assert zb.lines("local config reloaded")
    # and new connections are denied now
    assert not lab.client(a, "echo", b.ip, "80", "--size", "64")["ok"]


def test_metric_byte_counters_equal_bytes_moved_both_reporters(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "halfclose", "--size", str(3 * MiB), port=80)
    za = lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False)
    out = lab.client(a, "halfclose", b.ip, "80", "--size", str(2 * MiB))
    assert out["received"] == 3 * MiB and out["error"] is None
    wait_for(lambda: zb.lines("connection complete") and za.lines("connection complete"), what="access logs")
    for pod, reporter in ((a, "source"), (b, "destination")):
        fams = metrics(lab, pod)
        labels = {"reporter": reporter, "source_workload": "sleep", "destination_workload": "httpbin",
                  "source_principal": "spiffe://cluster.local/ns/demo/sa/sleep",
                  "destination_principal": "spiffe://cluster.local/ns/demo/sa/httpbin",
                  "connection_security_policy": "mutual_tls", "request_protocol": "tcp"}
        # request direction (client -> server) is "received", the response direction "sent"
        assert total(fams, "istio_tcp_received_bytes_total", **labels) == 2 * MiB, reporter
        assert total(fams, "istio_tcp_sent_bytes_total", **labels) == 3 * MiB, reporter
        assert total(fams, "istio_tcp_connections_opened_total", **labels) == 1
        assert total(fams, "istio_tcp_connections_closed_total", **labels) == 1
        assert samples(fams, "istio_build", component="ztunnel")
        assert "process_open_fds" in fams
    line = za.lines("connection complete")[0]
    assert f"bytes_sent={2 * MiB} bytes_recv={3 * MiB}" in line and "direction=outbound" in line
    assert "src.identity=spiffe://cluster.local/ns/demo/sa/sleep" in line
    assert f"dst.hbone_addr={b.ip}:80" in line and f"dst.addr={b.ip}:15008" in line


def test_config_dump_logging_and_readiness(lab):
    a, b, legacy, za, zb = mesh(lab, [DENY_SLEEP])
    status, body = lab.http(b, "http://localhost:15000/config_dump")
    assert status == 200
    dump = orjson.loads(body)
    assert {"workloads", "services", "policies", "certificates", "config", "version", "staticConfig"} <= dump.keys()
    names = {w["name"]: w for w in dump["workloads"]}
    assert names["httpbin"]["workloadIps"] == [b.ip] and names["httpbin"]["protocol"] == "HBONE"
    assert names["legacy"]["protocol"] == "TCP"
    assert dump["policies"][0]["name"] == "deny-sleep"
    assert dump["policies"][0]["rules"] == DENY_SLEEP["rules"]
    cert = dump["certificates"][0]
    assert cert["identity"] == "spiffe://cluster.local/ns/demo/sa/httpbin" and cert["state"] == "Available"
    assert cert["certChain"][0]["serialNumber"] and cert["certChain"][0]["expirationTime"].endswith("Z")
    assert dump["config"]["proxyMode"] == "dedicated"
    # the istioctl-style tables, read from this pod's admin endpoint
    import sys
    res = lab.topology.run(b.pod, [sys.executable, "-m", "ztunnel_fast", "proxy-config", "workloads"])
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[1:]}
    assert rows["httpbin"] == ["httpbin", "demo", b.ip, "node1", "None", "HBONE"]
    assert rows["legacy"][-1] == "TCP"
    res = lab.topology.run(b.pod, [sys.executable, "-m", "ztunnel_fast", "proxy-config", "secrets"])
    chain = [line for line in res.stdout.splitlines() if "Cert Chain" in line][0].split()
    assert chain[0] == "spiffe://cluster.local/ns/demo/sa/httpbin" and chain[3:5] == ["Available", "true"]
    # readiness
    assert lab.http(b, "http://127.0.0.1:15021/healthz/ready") == (200, "ready\n")
    assert lab.http(b, "http://127.0.0.1:15021/healthz/ready", method="POST")[0] == 405
    # log levels change at run time
    status, text = lab.http(b, "http://localhost:15000/logging?level=debug", method="POST")
    assert status == 200 and "debug" in text
    lab.client(legacy, "echo", b.ip, "80", "--size", "16")
    wait_for(lambda: zb.lines(" DEBUG "), what="a debug line after raising the level")
    assert lab.http(b, "http://localhost:15000/logging?level=loud", method="POST")[0] == 400
    assert lab.http(b, "http://localhost:15000/nope")[0] == 404


def test_json_logs(lab):
    a, b, legacy, za, zb = mesh(lab, [], LOG_FORMAT="json")
    assert lab.client(a, "echo", b.ip, "80", "--size", "64")["ok"]
    records = [orjson.loads(line) for line in wait_for(lambda: za.lines('"connection complete"'), what="json line")]
    assert records[0]["scope"] == "ztunnel_fast::access" and records[0]["direction"] == "outbound"
    assert records[0]["bytes_sent"] == 64 and records[0]["level"] == "info"


@pytest.mark.parametrize("how", ["sigterm", "quitquitquit"])
def test_transfer_in_flight_survives_drain(lab, how):
    a, b, legacy, za, zb = mesh(lab, [])
    size = 100 * 1000 * 1000
    proc, out_path = lab.client_background(a, "echo", b.ip, "80", "--size", str(size), "--chunk-delay", "0.004")
    wait_for(lambda: za.lines("proxy to"), what="tunnel start")
    time.sleep(0.3)
    if how == "sigterm":
        za.proc.send_signal(signal.SIGTERM)
    else:
        assert lab.http(a, "http://localhost:15000/quitquitquit", method="POST")[0] == 200
    wait_for(lambda: za.lines("draining"), what="drain start")
    # while draining the proxy reports not ready, and accepts no new connections
    status, text = lab.http(a, "http://127.0.0.1:15021/healthz/ready")
    assert (status, text) == (500, 'not ready, pending: {"drain"}\n')
    assert not lab.client(a, "echo", b.ip, "80", "--size", "64")["ok"]
    assert za.proc.wait(timeout=30) == 0
    proc.wait(timeout=30)
    out = json.loads(out_path.read_text().strip().splitlines()[-1])
    assert out["ok"] and out["received"] == size and out["received_sha256"] == out["sent_sha256"], out
    assert za.lines("shutdown complete") and not za.lines("drain deadline reached")
