"""The bench topology: two pods (client, server) on a bridge or on one veth pair, their apps and
kernel settings.

  pod client  198.18.0.1   load generators (iperf3 -c, wrk, tunnels.py open), the client-side proxy
  pod server  198.18.0.2   iperf3 -s :5201, nginx :80 (1 KiB body), tunnels.py serve :7000,
                           the server-side proxy (HBONE on :15008)

Topology "bridge" (the default): each pod's eth0 is a veth whose peer is a port of a bridge in a
third namespace (netns.Topology).  "veth": the same pods, then their eth0s are replaced by one veth
pair between the two pods (no bridge on the path), same addresses; what the held-out measurement
of issue 14 used.

Every setup gets a fresh topology (a new `ztb-<hex>-<setup>` namespace set), so TIME_WAIT
sockets, conntrack entries and pooled connections of one setup never affect the next.

Invariants: everything is created through ztunnel_fast.netns (nothing in the host namespace) and
goes away with `BenchLab.teardown()`; the apps are the same programs with the same settings in
every setup, and the load generators always connect to <server ip>:<app port>.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ztunnel_fast import netns
from ztunnel_fast.demo.lab import Lab, LabPod

from .parse import count_ss_lines

PREFIX = "ztb-"  # namespaces of bench runs (tests use ztf-); stale ones are removed at start
HTTP_PORT = 80
IPERF_PORT = 5201
HOLD_PORT = 7000
APP_PORTS = (HTTP_PORT, IPERF_PORT, HOLD_PORT)
NAMESPACE = "bench"
TUNNELS_SCRIPT = Path(__file__).with_name("tunnels.py")

# Per-pod kernel settings (network namespaces have their own copies): enough ephemeral ports for
# the new-connection-per-request run and 10,000 tunnels, and TIME_WAIT reuse for the client side.
POD_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65000",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.core.somaxconn": "4096",
}


def nginx_conf(root: Path, ip: str, port: int, body_bytes: int) -> str:
    """A minimal nginx (1 worker, no access log, long keep-alive) answering every GET with a fixed
    body of `body_bytes` bytes; every path it writes lives under `root`."""
    body = "x" * body_bytes
    return f"""\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {{
        listen {ip}:{port} backlog=4096;
        location / {{ return 200 "{body}"; }}
    }}
}}
"""


class BenchLab:
    """Two pods with their apps, on a fresh topology named after `setup`."""

    def __init__(self, workdir: Path, setup: str, run_id: str, body_bytes: int,
                 apps: tuple[str, ...] = ("iperf3", "nginx", "holder"), topology: str = "bridge"):
        if topology not in ("bridge", "veth"):
            raise ValueError(f"unknown topology {topology!r} (bridge or veth)")
        self.workdir = Path(workdir)
        self.kind = topology
        self.topology = netns.Topology(prefix=f"{PREFIX}{run_id}-{setup}")
        self.apps: dict[str, subprocess.Popen] = {}
        try:
            self.lab = Lab(self.topology, self.workdir, engine="auto", log_level="info")
            self.client: LabPod = self.lab.pod("client", namespace=NAMESPACE, service_account="client")
            self.server: LabPod = self.lab.pod("server", namespace=NAMESPACE, service_account="server")
            if topology == "veth":
                self._direct_veth()
            for pod in (self.client, self.server):
                for key, value in POD_SYSCTLS.items():
                    self.run(pod, ["sysctl", "-q", "-w", f"{key}={value}"])
            self.lab.write_config()
            self._start_apps(body_bytes, apps)
        except BaseException:
            self.topology.teardown()  # a half-built lab leaves nothing behind
            raise

    def _direct_veth(self) -> None:
        """Replace both pods' bridge ports by one veth pair between them (addresses unchanged).
        Both ends live in the pods' namespaces, so deleting them (teardown) removes the pair."""
        prefixlen = self.topology.subnet.prefixlen
        for pod in (self.client, self.server):
            self.run(pod, ["ip", "link", "del", netns.Topology.POD_IF])  # also removes its bridge port
        self.run(self.client, ["ip", "link", "add", netns.Topology.POD_IF, "type", "veth", "peer", "name",
                               netns.Topology.POD_IF, "netns", self.server.pod.netns])
        for pod in (self.client, self.server):
            self.run(pod, ["ip", "addr", "add", f"{pod.ip}/{prefixlen}", "dev", netns.Topology.POD_IF])
            self.run(pod, ["ip", "link", "set", netns.Topology.POD_IF, "up"])
            self.run(pod, ["ip", "route", "add", "default", "dev", netns.Topology.POD_IF])

    # -- processes ---------------------------------------------------------------------------
    def run(self, pod: LabPod, argv: list[str], timeout: float = netns.CMD_TIMEOUT_S,
            **kw) -> subprocess.CompletedProcess:
        return self.topology.run(pod.pod, argv, timeout=timeout, **kw)

    def popen(self, pod: LabPod, argv: list[str], log_name: str, **kw) -> subprocess.Popen:
        with open(self.workdir / log_name, "ab") as log:
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            return self.topology.popen(pod.pod, argv, **kw)

    def _start_apps(self, body_bytes: int, apps: tuple[str, ...]) -> None:
        """Start the named server apps (all three for the bench; the soak needs only the holder)."""
        ip = self.server.ip
        ports = {"iperf3": IPERF_PORT, "nginx": HTTP_PORT, "holder": HOLD_PORT}
        if "iperf3" in apps:
            self.apps["iperf3"] = self.popen(self.server, ["iperf3", "-s", "-B", ip, "-p", str(IPERF_PORT)],
                                             "iperf3-server.log")
        if "nginx" in apps:
            root = self.workdir / "nginx"
            root.mkdir(parents=True, exist_ok=True)
            conf = root / "nginx.conf"
            conf.write_text(nginx_conf(root, ip, HTTP_PORT, body_bytes))
            self.apps["nginx"] = self.popen(
                self.server, ["nginx", "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")], "nginx.log")
        if "holder" in apps:
            self.apps["holder"] = self.popen(
                self.server, [sys.executable, str(TUNNELS_SCRIPT), "serve", ip, str(HOLD_PORT)], "tunnels-holder.log")
        for name in apps:
            netns.wait_listening(self.server.pod, ports[name], timeout=15)
        for name, proc in self.apps.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} in the server pod; see {self.workdir}")

    def http_check(self, timeout: float = 10.0) -> int:
        """One GET from the client pod to the server's nginx; returns the HTTP status (0 = failed)."""
        cp = self.run(self.client, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(timeout),
                                    f"http://{self.server.ip}:{HTTP_PORT}/"], timeout=timeout + 5, check=False)
        return int(cp.stdout.strip() or 0) if cp.stdout.strip().isdigit() else 0

    def established(self, pod: LabPod, filter_expr: str | None = None) -> int:
        """TCP sockets in state established in the pod (`ss` filter optional, e.g. 'dport = :15008')."""
        argv = ["ss", "-Htn", "state", "established"] + ([filter_expr] if filter_expr else [])
        return count_ss_lines(self.run(pod, argv, check=False).stdout)

    def teardown(self) -> None:
        self.topology.teardown()
