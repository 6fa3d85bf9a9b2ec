"""The fake istiod: its xDS side (FakeXds) and its CA (FakeCA) on ONE gRPC server, one port, one TLS.

Role: what a cluster's ztunnel talks to at istiod.istio-system.svc:15012.  Both services share
the serving certificate of the CA's authority (FakePki: a leaf for istiod.istio-system.svc issued
by the intermediate under the root), so the one trust bundle a pod mounts (root-cert.pem, the
`istio-ca-root-cert` ConfigMap) verifies the xDS stream (XDS_ROOT_CA) and the CA calls (CA_ROOT_CA)
as in a real cluster, and the workload certificates the CA issues chain to the same root.

The servicers are the existing doubles (fakes/xds_server.py, fakes/ca_server.py), each added to
this server with its `add_to`; nothing of their logic is repeated here.

Config file (watched, re-read on change; `serve_file`): the local-config shape that xDS serves,
plus the doubles' knobs: `malformed` (xDS) and `callers` (CA bearer tokens, list of
{token, serviceAccount: "ns/sa", identities: [spiffe ids it may impersonate]}).  `--caller`
options add callers that the file cannot remove.  Each loaded version prints one JSON line
{"event": "config", ...} after both sides took it, so a reader of that line knows the CA knows
the callers and connected clients have been sent the deltas.

Run: `python -m ztunnel_fast.fakes.istiod --pki DIR --listen ADDR --config FILE [--caller
TOKEN,ns/sa[,spiffe-id...]] [--record FILE]`; JSON lines on stdout: "listening", "config",
each xDS "request"; CA requests are appended to --record.  Only loopback or a test-made network
namespace is ever listened on (the caller chooses the address).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Callable

import grpc

from .ca_server import DEFAULT_CLUSTER_ID, ISTIOD_NAME, Caller, FakeCA, FakePki, parse_caller
from .xds_server import FakeXds, serve_file

__all__ = ["FakeIstiod", "ISTIOD_NAME", "callers_from_knobs", "main"]


class FakeIstiod:
    """One grpc.aio server over TLS hosting `xds` and `ca`; restartable on the same port."""

    def __init__(self, pki: FakePki, *, xds: FakeXds | None = None, ca: FakeCA | None = None):
        self.pki = pki
        self.xds = xds or FakeXds()
        self.ca = ca or FakeCA(pki)
        self._server: grpc.aio.Server | None = None
        self.host: str | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        server = grpc.aio.server()
        self.xds.add_to(server)
        self.ca.add_to(server)
        creds = grpc.ssl_server_credentials([(self.pki.serving_key_pem, self.pki.serving_chain_pem)])
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = server.add_secure_port(target, creds)
        if not bound:
            raise OSError(f"fake istiod cannot listen on {target}")
        await server.start()
        self._server, self.host, self.port = server, host, bound
        return bound

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (open xDS streams end with UNAVAILABLE); resources and callers stay."""
        if self._server is not None:
            self.xds.drop_streams()
            await self._server.stop(grace)
            self._server = None


def callers_from_knobs(knobs: dict) -> dict[str, Caller]:
    """The config file's `callers` list as FakeCA.callers (token -> Caller)."""
    out: dict[str, Caller] = {}
    for entry in knobs.get("callers") or []:
        token, account = str(entry["token"]), str(entry["serviceAccount"])
        if not token or "/" not in account:
            raise ValueError(f"callers: wants token and serviceAccount ns/sa: {entry!r}")
        out[token] = Caller(account, frozenset(entry.get("identities") or ()))
    return out


def _caller_updater(ca: FakeCA, fixed: dict[str, Caller]) -> Callable[[dict], None]:
    def update(knobs: dict) -> None:
        ca.callers = {**callers_from_knobs(knobs), **fixed}

    return update


async def _serve(args: argparse.Namespace) -> int:
    pki = FakePki.create(args.pki, args.trust_domain)
    fixed = dict(args.caller)
    ca = FakeCA(pki, dict(fixed), cluster_id=args.cluster_id, fail_next=args.fail, record_path=args.record)
    xds = FakeXds(on_request=lambda r: print(json.dumps(r.as_json()), flush=True))
    istiod = FakeIstiod(pki, xds=xds, ca=ca)
    host, _, port = args.listen.rpartition(":")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await istiod.start(host.strip("[]"), int(port))
    print(json.dumps({"event": "listening", "address": istiod.address, "serverName": ISTIOD_NAME,
                      "root": str(pki.root_path)}), flush=True)
    try:
        await serve_file(Path(args.config), xds, stop, on_knobs=_caller_updater(ca, fixed))
    finally:
        await istiod.stop(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel_fast.fakes.istiod", description=__doc__.split("\n")[0])
    parser.add_argument("--pki", type=Path, required=True,
                        help="directory of the fake authority (created if absent); root-cert.pem verifies both sides")
    parser.add_argument("--listen", default="127.0.0.1:15012", help="host:port")
    parser.add_argument("--config", type=Path, required=True,
                        help="local-config YAML served over xDS (+ malformed, callers); re-read when it changes")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--cluster-id", default=DEFAULT_CLUSTER_ID)
    parser.add_argument("--caller", type=parse_caller, action="append", default=[],
                        help="TOKEN,ns/sa[,spiffe-id...]: a bearer token and what it may impersonate")
    parser.add_argument("--fail", type=int, default=0, help="fail this many first CA calls with UNAVAILABLE")
    parser.add_argument("--record", type=Path, help="append one JSON line per CA request here")
    args = parser.parse_args(argv)
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
