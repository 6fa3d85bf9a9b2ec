"""Pods as Linux network namespaces on one L2 segment: the test and demo topology.

Role: build small, throw-away topologies (one netns per pod, all pods on a bridge that lives in its
own ``<prefix>-net`` namespace), run processes inside pods, and install the minimal dedicated-mode
redirection of the reference (section 8.3).  Used by tests/e2e, tests/interop and the `demo` command.
Node-level topologies: `add_node` puts a node on the segment, `add_node_pod` puts pods behind it
(veth to the node, default route via the node), so a node-level ztunnel-fast can capture them.

Invariants:
- Nothing is created in the host network namespace.  Each veth pair is created directly between a
  pod netns (``eth0``) and the bridge netns, so deleting the namespaces removes every interface,
  route and iptables rule this module made.  A crash can leak namespaces only, never host state.
- Every name carries the topology prefix (default ``ztf-<6 hex>``, unique per run); interface names
  are namespace-local and at most 15 characters.
- Pod addresses come from the benchmark range 198.18.0.0/15 (RFC 2544); other subnets are refused.
- Every wait is bounded; teardown is idempotent and also runs at interpreter exit and on
  SIGTERM/SIGINT.  Only processes started through :meth:`Topology.popen`, or found inside our own
  namespaces, are ever signalled.
- Before a namespace is created an owner file (pid + process start time) is written, so
  :func:`cleanup_stale` removes leftovers of dead runs without touching a concurrent live run.
"""

from __future__ import annotations

import atexit
import fnmatch
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = [
    "Pod",
    "NodeInfo",
    "Topology",
    "NetnsCommandError",
    "cleanup_stale",
    "exec_argv",
    "iptables",
    "redirect_outbound",
    "redirect_inbound_plaintext",
    "wait_listening",
    "echo_server_argv",
    "send_recv_argv",
    "BENCHMARK_RANGE",
]

# RFC 2544 benchmark range: never routed on real networks, so pods can't collide with anything real.
BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")
# Where ownership of each namespace is recorded (tmpfs, cleared on reboot like the namespaces).
OWNER_DIR = Path("/run/ztunnel-fast/netns-owners")
IFNAMSIZ = 15  # Linux interface names: 16 bytes including the NUL
TERM_GRACE_S = 5.0  # SIGTERM -> SIGKILL grace for processes we started
CMD_TIMEOUT_S = 60.0  # upper bound for any helper command (ip, iptables, ss)
_POD_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


class NetnsCommandError(subprocess.CalledProcessError):
    """A command run in a namespace failed; unlike the base class, str() shows its stderr."""

    def __str__(self) -> str:
        err = self.stderr if isinstance(self.stderr, str) else (self.stderr or b"").decode(errors="replace")
        return f"{super().__str__()} stderr: {err.strip()[-2000:]}"


@dataclass(frozen=True)
class Pod:
    name: str  # short pod name given to add_pod ("a", "sleep", ...)
    netns: str  # namespace name: f"{prefix}-{name}"
    ip: str  # IPv4 address on the segment (prefix length of the topology subnet)
    node: str | None = None  # add_node_pod: the node this pod sits behind (None: on the segment)


@dataclass
class NodeInfo:
    """A node made by :meth:`Topology.add_node` and the pods behind it."""

    name: str
    pod: Pod  # the node's own namespace on the segment
    pod_subnet: ipaddress.IPv4Network | None
    free_hosts: Iterator[ipaddress.IPv4Address]
    pods: list[Pod] = field(default_factory=list)


def _netns_of(pod: Pod | str | None) -> str | None:
    if pod is None:
        return None
    return pod.netns if isinstance(pod, Pod) else str(pod)


def exec_argv(pod: Pod | str | None, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside the pod's namespace (unchanged for None = current netns)."""
    ns = _netns_of(pod)
    argv = [str(a) for a in argv]
    return argv if ns is None else ["ip", "netns", "exec", ns, *argv]


def _run(pod: Pod | str | None, argv: Sequence[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    if "stdout" not in kw and "stderr" not in kw:
        kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", CMD_TIMEOUT_S)
    full = exec_argv(pod, argv)
    cp = subprocess.run(full, check=False, **kw)
    if check and cp.returncode != 0:
        raise NetnsCommandError(cp.returncode, full, cp.stdout, cp.stderr)
    return cp


# --------------------------------------------------------------------------------------------------
# helpers usable on any pod


def iptables(pod: Pod | str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `iptables-legacy -w 10 <args>` inside the pod.

    Legacy backend on purpose: the product writes rules with python-iptables (legacy xtables), and a
    namespace must not mix backends.  `-w` waits for the xtables lock, which is host-wide.
    """
    return _run(pod, ["iptables-legacy", "-w", "10", *args], check=check)


def redirect_outbound(pod: Pod | str, port: int = 15001, mark: int = 1337) -> None:
    """Dedicated-mode outbound capture (reference 8.3): all TCP leaving the pod, except loopback and
    sockets carrying `mark` in the low 12 bits, is REDIRECTed to `port` on the pod itself."""
    iptables(pod, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-o", "lo",
             "-m", "mark", "!", "--mark", f"{mark:#x}/0xfff", "-j", "REDIRECT", "--to-ports", str(port))


def redirect_inbound_plaintext(pod: Pod | str, port: int = 15006, mark: int = 1337) -> None:
    """Inbound plaintext capture: TCP arriving for any port but 15008 (HBONE) is REDIRECTed to `port`."""
    iptables(pod, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "!", "--dport", "15008",
             "-m", "mark", "!", "--mark", f"{mark:#x}/0xfff", "-j", "REDIRECT", "--to-ports", str(port))


def wait_listening(pod: Pod | str | None, port: int, timeout: float = 10.0) -> None:
    """Poll `ss -ltnH` in the pod until some socket listens on TCP `port`; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        cp = _run(pod, ["ss", "-ltnH", f"sport = :{int(port)}"], check=False)
        if cp.returncode == 0 and cp.stdout.strip():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on tcp port {port} in {_netns_of(pod) or 'current netns'} after {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# --------------------------------------------------------------------------------------------------
# traffic probes: tiny one-shot programs run in pods (`python -c`), reporting one JSON line

_ECHO_SERVER = r"""
import hashlib, json, socket, sys
ip, port, timeout, echo = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
srv = socket.create_server((ip, port))
srv.settimeout(timeout)
c, peer = srv.accept()
c.settimeout(timeout)
h, n, err = hashlib.sha256(), 0, None
try:
    while True:
        d = c.recv(65536)
        if not d:
            break
        h.update(d)
        n += len(d)
        if echo:
            c.sendall(d)
    c.shutdown(socket.SHUT_WR)
except OSError as e:
    err = repr(e)
c.close()
print(json.dumps({"received": n, "sha256": h.hexdigest(), "peer": "%s:%d" % peer[:2], "error": err}), flush=True)
"""

_SEND_RECV = r"""
import hashlib, json, os, socket, sys, threading
ip, port, nbytes, timeout, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
data = os.urandom(nbytes)
out = {"sent_sha256": hashlib.sha256(data).hexdigest(), "sent": 0, "received": 0, "error": None, "send_error": None}
c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
if mark:
    c.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
c.settimeout(timeout)
h = hashlib.sha256()
try:
    c.connect((ip, port))
    out["local"] = "%s:%d" % c.getsockname()[:2]
    def tx():  # own thread: writing 1 MiB while the echo comes back must not deadlock
        try:
            c.sendall(data)
            out["sent"] = len(data)
            c.shutdown(socket.SHUT_WR)
        except OSError as e:
            out["send_error"] = repr(e)
    t = threading.Thread(target=tx, daemon=True)
    t.start()
    while True:
        d = c.recv(65536)
        if not d:
            break
        h.update(d)
        out["received"] += len(d)
    t.join(timeout)
except OSError as e:
    out["error"] = repr(e)
out["received_sha256"] = h.hexdigest()
print(json.dumps(out), flush=True)
"""


def echo_server_argv(ip: str, port: int, timeout: float = 30.0, echo: bool = True) -> list[str]:
    """argv of a one-connection TCP server: reads to EOF (echoing if `echo`), then prints
    ``{"received", "sha256", "peer", "error"}``.  Gives up after `timeout` s without a client."""
    return [sys.executable, "-c", _ECHO_SERVER, ip, str(port), str(timeout), "1" if echo else "0"]


def send_recv_argv(ip: str, port: int, nbytes: int, timeout: float = 30.0, mark: int = 0) -> list[str]:
    """argv of a client that sends `nbytes` random bytes, half-closes, reads to EOF and prints
    ``{"sent", "sent_sha256", "received", "received_sha256", "local", "error", "send_error"}``.
    `mark` sets SO_MARK (e.g. 1337 to bypass the redirection)."""
    return [sys.executable, "-c", _SEND_RECV, ip, str(port), str(nbytes), str(timeout), str(mark)]


# --------------------------------------------------------------------------------------------------
# namespace ownership and stale cleanup


def _proc_start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot) of `pid`, to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parens: split after the last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _write_owner(netns: str) -> None:
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    (OWNER_DIR / netns).write_text(f"{pid} {_proc_start_time(pid)}\n")


def _owner_alive(netns: str) -> bool:
    try:
        pid_s, start = (OWNER_DIR / netns).read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _proc_start_time(pid) == start


def _remove_owner(netns: str) -> None:
    try:
        (OWNER_DIR / netns).unlink()
    except FileNotFoundError:
        pass


def _list_netns() -> list[str]:
    cp = _run(None, ["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _kill_netns_pids(netns: str, grace: float = TERM_GRACE_S) -> None:
    """Signal the processes living in one of *our* namespaces (TERM, then KILL after `grace`)."""
    cp = _run(None, ["ip", "netns", "pids", netns], check=False)
    pids = [int(p) for p in cp.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    if not pids:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete_netns(netns: str) -> None:
    if netns not in _list_netns():
        _remove_owner(netns)
        return
    _kill_netns_pids(netns)
    _run(None, ["ip", "netns", "delete", netns], check=False)
    _remove_owner(netns)


def cleanup_stale(prefix_glob: str = "ztf-") -> list[str]:
    """Delete namespaces left by earlier crashed runs; returns the names deleted.

    `prefix_glob` is a glob (``ztf-*-net``) or, without wildcard characters, a name prefix.  A
    namespace whose recorded owner process is still alive belongs to a concurrent run and is kept.
    """
    pattern = prefix_glob if any(c in prefix_glob for c in "*?[") else prefix_glob + "*"
    removed = []
    for ns in _list_netns():
        if fnmatch.fnmatchcase(ns, pattern) and not _owner_alive(ns):
            _delete_netns(ns)
            removed.append(ns)
    # owner files whose namespace is gone (crash between delete and unlink)
    if OWNER_DIR.is_dir():
        existing = set(_list_netns())
        for f in OWNER_DIR.iterdir():
            if fnmatch.fnmatchcase(f.name, pattern) and f.name not in existing and not _owner_alive(f.name):
                _remove_owner(f.name)
    return removed


# --------------------------------------------------------------------------------------------------
# cleanup at exit and on SIGTERM/SIGINT

_LIVE: dict[int, "Topology"] = {}
_prev_handlers: dict[int, Any] = {}
_cleanup_installed = False


def _teardown_all() -> None:
    for topo in list(_LIVE.values()):
        try:
            topo.teardown()
        except Exception as exc:  # keep going: the other topologies must still go
            print(f"ztunnel_fast.netns: teardown of {topo.prefix} failed: {exc!r}", file=sys.stderr)


def _on_signal(signum: int, frame: Any) -> None:
    _teardown_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):  # e.g. default_int_handler -> KeyboardInterrupt
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # SIG_DFL (or unknown): die the default way, with the right exit status
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_cleanup() -> None:
    global _cleanup_installed
    if _cleanup_installed:
        return
    _cleanup_installed = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            _prev_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)


# --------------------------------------------------------------------------------------------------
# the topology


class Topology:
    """Pods as network namespaces on one L2 segment (a bridge in its own 'net' namespace).

    ``with Topology() as t: a = t.add_pod("a"); t.run(a, ["ip", "addr"])``.  Pods get ``eth0`` with
    an address from `subnet` and a device default route (no gateway), so any destination outside
    the pod, e.g. a 198.19.x service VIP, leaves through eth0 and can be REDIRECTed by iptables.
    """

    BRIDGE = "br0"  # lives in the '<prefix>-net' namespace, so the name never clashes
    POD_IF = "eth0"

    def __init__(self, prefix: str | None = None, subnet: str = "198.18.0.0/24") -> None:
        self.prefix = prefix or f"ztf-{secrets.token_hex(3)}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", self.prefix):
            raise ValueError(f"bad topology prefix {self.prefix!r}")
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.version != 4 or not self.subnet.subnet_of(BENCHMARK_RANGE):
            raise ValueError(f"subnet {subnet} must be inside {BENCHMARK_RANGE} (benchmark range)")
        self.pods: dict[str, Pod] = {}
        self.net_ns = f"{self.prefix}-net"
        self._namespaces: list[str] = []  # recorded *before* creation, so teardown sees half-made ones
        self._procs: list[subprocess.Popen] = []
        self._free_hosts: Iterable[ipaddress.IPv4Address] = self.subnet.hosts()
        self.nodes: dict[str, NodeInfo] = {}  # add_node: node name -> its pods and pod subnet
        self._closed = False
        self._started = False

    # ---- lifecycle

    def _ensure_segment(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError(f"topology {self.prefix} is torn down")
        self._started = True
        _install_cleanup()
        _LIVE[id(self)] = self
        self._add_netns(self.net_ns)
        _run(self.net_ns, ["ip", "link", "set", "lo", "up"])
        _run(self.net_ns, ["ip", "link", "add", self.BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        _run(self.net_ns, ["ip", "link", "set", self.BRIDGE, "up"])

    def _add_netns(self, ns: str) -> None:
        if ns in _list_netns():  # never adopt (and later delete) a namespace that is not ours
            raise FileExistsError(f"network namespace {ns} already exists")
        self._namespaces.append(ns)
        _write_owner(ns)
        _run(None, ["ip", "netns", "add", ns])

    def _claim(self, name: str, ip: str | None, free_hosts, exhausted: str) -> str:
        """Check a new pod's name and take its address: `ip`, or the next free one of `free_hosts`."""
        if not _POD_NAME_RE.match(name) or name == "net":
            raise ValueError(f"bad pod name {name!r} (lowercase letters, digits, '-'; not 'net')")
        if name in self.pods:
            raise ValueError(f"pod {name!r} exists")
        used = {p.ip for p in self.pods.values()}
        if ip is None:
            ip = next((str(h) for h in free_hosts if str(h) not in used), None)
            if ip is None:
                raise ValueError(exhausted)
        elif ip in used:
            raise ValueError(f"{ip} already used")
        return ip

    def add_pod(self, name: str, ip: str | None = None) -> Pod:
        """Create netns f"{prefix}-{name}" wired to the segment; returns the Pod."""
        ip = self._claim(name, ip, self._free_hosts, f"no free address left in {self.subnet}")
        addr = ipaddress.ip_address(ip)
        if addr not in self.subnet or addr in (self.subnet.network_address, self.subnet.broadcast_address):
            raise ValueError(f"{ip} is not a host address of {self.subnet}")
        self._ensure_segment()
        ns = f"{self.prefix}-{name}"
        peer = f"v{len(self.pods)}-{name}"[:IFNAMSIZ]  # bridge side; local to the net netns
        self._add_netns(ns)
        _run(ns, ["ip", "link", "set", "lo", "up"])
        # Created straight into both namespaces: no interface ever appears on the host.
        _run(None, ["ip", "-n", ns, "link", "add", self.POD_IF, "type", "veth", "peer", "name", peer, "netns", self.net_ns])
        _run(self.net_ns, ["ip", "link", "set", peer, "master", self.BRIDGE, "up"])
        _run(ns, ["ip", "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", self.POD_IF])
        _run(ns, ["ip", "link", "set", self.POD_IF, "up"])
        _run(ns, ["ip", "route", "add", "default", "dev", self.POD_IF])
        pod = Pod(name=name, netns=ns, ip=ip)
        self.pods[name] = pod
        self._route_to_node_pods(pod)
        return pod

    # ---- nodes: pods behind a node that routes for them (node-level redirection)

    def add_node(self, name: str, ip: str | None = None, pod_subnet: str | None = None) -> Pod:
        """A node: a namespace on the segment (made like a pod, its address from the segment)
        that forwards for the pods behind it (:meth:`add_node_pod`).  Forwarding on, rp_filter
        off; it routes the pods of every other node via that node's segment address, and every
        segment host learns routes to this node's pods.  `pod_subnet` (inside 198.18.0.0/15,
        outside the segment) is where :meth:`add_node_pod` picks addresses when given none."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        net = None
        if pod_subnet is not None:
            net = ipaddress.ip_network(pod_subnet)
            self._check_pod_subnet(net)
            for other in self.nodes.values():
                if other.pod_subnet is not None and net.overlaps(other.pod_subnet):
                    raise ValueError(f"pod subnet {net} overlaps node {other.name}'s {other.pod_subnet}")
        node = self.add_pod(name, ip)  # also routes the existing node pods (see _route_to_node_pods)
        for key in ("net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
                    f"net.ipv4.conf.{self.POD_IF}.rp_filter"):
            value = "1" if key == "net.ipv4.ip_forward" else "0"
            _run(node, ["sysctl", "-q", "-w", f"{key}={value}"])
        self.nodes[name] = NodeInfo(name=name, pod=node, pod_subnet=net,
                                    free_hosts=net.hosts() if net is not None else iter(()))
        return node

    def add_node_pod(self, node: Pod | str, name: str, ip: str | None = None) -> Pod:
        """A pod behind `node`: its own namespace whose eth0 is a veth to the node (address /32,
        default route via the node's segment address, on-link), and a /32 route to it on the
        node.  Every other segment host (nodes and plain pods) routes it via the node, so
        service VIPs and cross-node traffic from the pod always cross its node."""
        info = self.nodes.get(node.name if isinstance(node, Pod) else str(node))
        if info is None:
            raise ValueError(f"{node!r} is not a node of this topology (add_node first)")
        ip = self._claim(name, ip, info.free_hosts, f"node {info.name} has no pod subnet or no free address left in it")
        self._check_pod_subnet(ipaddress.ip_network(f"{ipaddress.ip_address(ip)}/32"))
        ns = f"{self.prefix}-{name}"
        node_if = f"p{len(self.pods)}-{name}"[:IFNAMSIZ]  # local to the node netns
        self._add_netns(ns)
        _run(ns, ["ip", "link", "set", "lo", "up"])
        _run(None, ["ip", "-n", ns, "link", "add", self.POD_IF, "type", "veth", "peer", "name", node_if,
                    "netns", info.pod.netns])
        _run(info.pod, ["ip", "link", "set", node_if, "up"])
        _run(info.pod, ["sysctl", "-q", "-w", f"net.ipv4.conf.{node_if}.rp_filter=0"])
        _run(info.pod, ["ip", "route", "add", f"{ip}/32", "dev", node_if])
        _run(ns, ["ip", "addr", "add", f"{ip}/32", "dev", self.POD_IF])
        _run(ns, ["ip", "link", "set", self.POD_IF, "up"])
        _run(ns, ["ip", "route", "add", "default", "via", info.pod.ip, "dev", self.POD_IF, "onlink"])
        pod = Pod(name=name, netns=ns, ip=ip, node=info.name)
        self.pods[name] = pod
        info.pods.append(pod)
        for host in self.pods.values():  # segment hosts: every node but ours, and plain pods
            if host.node is None and host.name != info.name:
                _run(host, ["ip", "route", "add", f"{ip}/32", "via", info.pod.ip])
        return pod

    def _check_pod_subnet(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        if net.version != 4 or not net.subnet_of(BENCHMARK_RANGE):
            raise ValueError(f"{net} must be inside {BENCHMARK_RANGE} (benchmark range)")
        if net.overlaps(self.subnet):
            raise ValueError(f"{net} overlaps the segment {self.subnet}: node pods need addresses of their own")

    def _route_to_node_pods(self, host: Pod) -> None:
        """A new segment host learns the routes to the pods that sit behind nodes."""
        for info in self.nodes.values():
            for p in info.pods:
                _run(host, ["ip", "route", "add", f"{p.ip}/32", "via", info.pod.ip])

    def run(self, pod: Pod | str | None, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """`ip netns exec <ns> argv`; check=True, text, captured output and a 60 s timeout by default."""
        return _run(pod, argv, **kw)

    def popen(self, pod: Pod | str | None, argv: Sequence[str], env: dict[str, str] | None = None,
              stdout: Any = None, stderr: Any = None, **kw: Any) -> subprocess.Popen:
        """Start argv in the pod (own session); tracked and stopped on teardown.

        stdout/stderr default to inheriting ours (pytest's fd capture shows them on failure);
        pass a file or DEVNULL for chatty long-lived processes, PIPE only if you read it.
        """
        if self._closed:
            raise RuntimeError(f"topology {self.prefix} is torn down")
        _install_cleanup()
        _LIVE[id(self)] = self
        proc = subprocess.Popen(exec_argv(pod, argv), env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = TERM_GRACE_S) -> int | None:
        """SIGTERM the process group of a tracked process, SIGKILL after `grace`; returns its status."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: pgid == pid while not reaped
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
        for f in (proc.stdout, proc.stderr, proc.stdin):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        return proc.returncode

    def teardown(self) -> None:
        """Stop tracked processes, then delete our namespaces (which removes veths, routes and
        iptables rules inside them).  Idempotent; safe to call from signal handlers and atexit."""
        self._closed = True
        # Items are removed only once handled, so a re-entrant call (a signal arriving while an
        # earlier teardown runs) finishes the job instead of skipping what the outer call held.
        live = [p for p in self._procs if p.poll() is None]
        for p in live:  # TERM all first, so their grace periods overlap
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + TERM_GRACE_S
        while self._procs:
            p = self._procs[-1]
            self.stop(p, grace=max(0.5, deadline - time.monotonic()))
            if self._procs and self._procs[-1] is p:
                self._procs.pop()
        # pods first, the bridge namespace last
        self._namespaces.sort(key=lambda n: n == self.net_ns)
        while self._namespaces:
            ns = self._namespaces[0]
            try:
                _delete_netns(ns)
            except Exception as exc:
                print(f"ztunnel_fast.netns: deleting {ns} failed: {exc!r}", file=sys.stderr)
            if self._namespaces and self._namespaces[0] == ns:
                self._namespaces.pop(0)
        self.pods.clear()
        self.nodes.clear()
        _LIVE.pop(id(self), None)

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"Topology({self.prefix!r}, {str(self.subnet)!r}, pods={list(self.pods)})"
