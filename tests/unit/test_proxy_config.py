"""The proxy-config tables, rendered from a config dump (no sockets)."""

from datetime import datetime, timezone

import orjson

from ztunnel_fast.admin.proxy_config import render, secrets_table, serial_text, workloads_table

DUMP = {
    "workloads": [
        {"name": "sleep-69cfb4968f-mwglt", "namespace": "ambient-demo", "workloadIps": ["10.240.1.4"],
         "node": "amb1-worker", "protocol": "HBONE"},
        {"name": "coredns-6d4b75cb6d-ptbhb", "namespace": "kube-system", "workloadIps": ["10.240.0.2"],
         "node": "amb1-control-plane", "protocol": "TCP"},
    ],
    "certificates": [
        {"identity": "spiffe://cluster.local/ns/ambient-demo/sa/sleep", "state": "Available",
         "certChain": [{"serialNumber": str(0xec30e0e1), "validFrom": "2023-09-19T18:26:19Z", "expirationTime": "2033-09-16T18:26:19Z"}],
         "rootCerts": [{"serialNumber": str(0x03b9dbea3), "validFrom": "2023-09-19T18:58:44Z", "expirationTime": "2023-09-20T19:00:44Z"}]},
    ],
}


def test_workloads_table_matches_the_guide_layout():
    lines = workloads_table(DUMP).splitlines()
    assert lines[0].split() == ["NAME", "NAMESPACE", "IP", "NODE", "WAYPOINT", "PROTOCOL"]
    assert lines[1].split() == ["coredns-6d4b75cb6d-ptbhb", "kube-system", "10.240.0.2", "amb1-control-plane", "None", "TCP"]
    assert lines[2].split() == ["sleep-69cfb4968f-mwglt", "ambient-demo", "10.240.1.4", "amb1-worker", "None", "HBONE"]
    # columns line up: every header starts where its values start
    col = lines[0].index("NAMESPACE")
    assert lines[1][col:].startswith("kube-system") and lines[2][col:].startswith("ambient-demo")


def test_secrets_table_rows_for_ca_and_chain_with_validity():
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    lines = secrets_table(DUMP, now).splitlines()
    assert lines[0].startswith("NAME") and "VALID CERT" in lines[0] and "SERIAL NUMBER" in lines[0]
    ca, chain = lines[1].split(), lines[2].split()
    assert ca[:3] == ["spiffe://cluster.local/ns/ambient-demo/sa/sleep", "CA", "Available"]
    assert ca[3] == "false"  # the CA row's validity ended in 2023
    assert chain[1:3] == ["Cert", "Chain"] and chain[4] == "true" and chain[5] == "ec30e0e1"
    assert chain[6] == "2033-09-16T18:26:19Z" and chain[7] == "2023-09-19T18:26:19Z"
    assert ca[4] == "3b9dbea3"  # istioctl's %x of the decimal serial: no leading zero


def test_serial_column_is_what_istioctl_prints():
    # config_dump holds the decimal serial; istioctl prints big.Int with %x
    serial = 0x0a5c87a881689217e4d44a88e8f724d6  # first byte below 0x10
    assert serial_text(str(serial)) == "a5c87a881689217e4d44a88e8f724d6"
    assert serial_text(str(0xec30e0e1b7105e3dce4425b5255287c6)) == "ec30e0e1b7105e3dce4425b5255287c6"
    assert serial_text("") == ""
    assert serial_text("not-a-number") == "not-a-number"


def test_json_and_all():
    assert orjson.loads(render("workloads", DUMP, "json"))[0]["name"] == "sleep-69cfb4968f-mwglt"
    text = render("all", DUMP)
    assert "PROTOCOL" in text and "SERVICE VIP" in text and "SERIAL NUMBER" in text


WAYPOINT_DUMP = {
    "workloads": [
        {"uid": "u-httpbin", "name": "httpbin-1", "namespace": "demo", "workloadIps": ["10.0.0.2"], "node": "n1",
         "protocol": "HBONE", "status": "Healthy",
         "waypoint": {"destination": "demo/waypoint.demo.svc.cluster.local", "hboneMtlsPort": 15008}},
        {"uid": "u-bare", "name": "bare", "namespace": "demo", "workloadIps": ["10.0.0.3"], "node": "n1",
         "protocol": "HBONE", "status": "Unhealthy", "waypoint": {"destination": "/10.0.0.99", "hboneMtlsPort": 15008}},
        {"uid": "u-wp", "name": "waypoint-1", "namespace": "demo", "workloadIps": ["10.0.0.50"], "node": "n1",
         "protocol": "HBONE", "status": "Healthy"},
    ],
    "services": [
        {"name": "httpbin", "namespace": "demo", "hostname": "httpbin.demo.svc.cluster.local", "vips": ["/10.96.0.10"],
         "waypoint": {"destination": "/10.96.0.50", "hboneMtlsPort": 15008},
         "endpoints": {"u-httpbin": {"workloadUid": "u-httpbin"}, "u-bare": {"workloadUid": "u-bare"}}},
        {"name": "waypoint", "namespace": "demo", "hostname": "waypoint.demo.svc.cluster.local",
         "vips": ["/10.96.0.50"], "endpoints": {"u-wp": {"workloadUid": "u-wp"}}},
    ],
}


def test_waypoint_column_names_the_waypoint_service():
    rows = {line.split()[0]: line.split() for line in workloads_table(WAYPOINT_DUMP).splitlines()[1:]}
    assert rows["httpbin-1"][4] == "waypoint"  # found by namespace/hostname
    assert rows["waypoint-1"][4] == "None"
    assert rows["bare"][4] == "/10.0.0.99"  # no service at that address: the destination itself


def test_services_table_shows_vip_waypoint_and_healthy_endpoints():
    lines = render("services", WAYPOINT_DUMP).splitlines()
    assert lines[0].split() == ["NAMESPACE", "SERVICE", "NAME", "SERVICE", "VIP", "WAYPOINT", "ENDPOINTS"]
    assert lines[1].split() == ["demo", "httpbin", "10.96.0.10", "waypoint", "1/2"]  # found by VIP
    assert lines[2].split() == ["demo", "waypoint", "10.96.0.50", "None", "1/1"]
    assert orjson.loads(render("services", WAYPOINT_DUMP, "json"))[0]["waypoint"]["destination"] == "/10.96.0.50"
