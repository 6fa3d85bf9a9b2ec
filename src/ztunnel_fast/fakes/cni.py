"""An istio-cni double for in-pod mode: the ZDS server side, plus the pod set-up istio-cni does.

It listens on an AF_UNIX SOCK_SEQPACKET socket (as istio-cni's node agent does at
/var/run/ztunnel/ztunnel.sock), accepts one ztunnel connection, expects ZdsHello{V1}, then sends
real WorkloadRequests (AddWorkload with the pod's netns fd from /var/run/netns/<name> in
SCM_RIGHTS, KeepWorkload, SnapshotSent, DelWorkload) and waits for each WorkloadResponse{ack}
with istio-cni's 5 s deadline.  `send_raw` sends arbitrary datagrams and fds (protocol-error
tests).  `install_inpod_rules` writes istio-cni's in-pod iptables rules into a pod namespace
(`ztunnel-fast redirect install --inpod --netns NAME`).

Blocking and synchronous: used from test code and the demo, which drive ztunnel-fast as a
separate process.  Invariants: every fd it opens is closed after sending; `close()` removes the
socket file; acks are recorded in order in `acks`.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
from pathlib import Path

from ..inpod import protocol
from ..inpod.protocol import WorkloadInfo

ACK_DEADLINE = 5.0  # seconds istio-cni waits for each ack (readWriteDeadline)
NETNS_DIR = Path("/var/run/netns")


class CniError(RuntimeError):
    pass


class FakeCni:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()  # a stale socket of an earlier run, like istio-cni does on start
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.acks: list[tuple[str, str]] = []  # (what was sent, Ack.error)

    # --- connection --------------------------------------------------------------------------------
    def accept(self, timeout: float = 30.0) -> int:
        """Wait for ztunnel-fast to connect and say hello; returns the announced version."""
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        conn.settimeout(ACK_DEADLINE)
        self.conn = conn
        version = protocol.parse_hello(conn.recv(protocol.RECV_BUFFER))
        if isinstance(version, protocol.ProtocolError):
            raise CniError(version.reason)
        if version != 1:
            raise CniError(f"ztunnel said hello with version {version}, expected V1")
        return version

    def disconnect(self) -> None:
        """Drop the ztunnel connection (as an istio-cni restart does); the listener stays."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.disconnect()
        self.listener.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "FakeCni":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: list[int] = (), what: str = "raw") -> str:
        """One datagram (with `fds` in SCM_RIGHTS); returns the Ack.error of the answer."""
        if self.conn is None:
            raise CniError("not connected")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.conn.sendmsg([data], anc)
        reply = self.conn.recv(protocol.RECV_BUFFER)
        if not reply:
            raise CniError("ztunnel closed the connection instead of acking")
        error = protocol.parse_response(reply)
        if isinstance(error, protocol.ProtocolError):
            raise CniError(error.reason)
        self.acks.append((what, error))
        return error

    def add(self, uid: str, netns_name: str, name: str, namespace: str, service_account: str) -> str:
        fd = os.open(NETNS_DIR / netns_name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.send_raw(protocol.add_request(uid, WorkloadInfo(name, namespace, service_account)), [fd],
                                 what=f"add {uid}")
        finally:
            os.close(fd)

    def keep(self, uid: str) -> str:
        return self.send_raw(protocol.keep_request(uid), what=f"keep {uid}")

    def delete(self, uid: str) -> str:
        return self.send_raw(protocol.del_request(uid), what=f"del {uid}")

    def snapshot_sent(self) -> str:
        return self.send_raw(protocol.snapshot_request(), what="snapshot_sent")


def install_inpod_rules(netns_name: str, uninstall: bool = False) -> None:
    """istio-cni's in-pod redirection inside the pod's namespace (the project's redirect CLI)."""
    argv = [sys.executable, "-m", "ztunnel_fast.redirect.cli", "uninstall" if uninstall else "install", "--inpod",
            "--netns", netns_name]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if cp.returncode != 0:
        raise CniError(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")
