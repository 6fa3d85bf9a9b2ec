"""The `ztunnel-fast` command: run, ca, demo, version.

`run` flags mirror ztunnel's environment variables one to one (`--local-xds-path` is
LOCAL_XDS_PATH, ...): a flag given on the command line overrides the variable, and both go through
Config.from_env, so there is one validation path and one set of error messages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import ClassVar

import click

from . import __version__
from .errors import IdentityError

# (flag, environment variable, help) for `run`; every flag takes a string, validated by Config.
RUN_FLAGS = [
    ("--proxy-mode", "PROXY_MODE", "shared (node proxy) or dedicated (one workload)"),
    ("--proxy-workload-info", "PROXY_WORKLOAD_INFO", "dedicated mode: the workload as ns/name/sa"),
    ("--local-xds-path", "LOCAL_XDS_PATH", "ztunnel local config YAML (workloads, services, policies)"),
    ("--local-ca-dir", "LOCAL_CA_DIR", "issue workload certificates from this local root (see `ca init`)"),
    ("--node-name", "NODE_NAME", "the node this instance serves (shared mode)"),
    ("--cluster-id", "CLUSTER_ID", "cluster name for telemetry and baggage"),
    ("--trust-domain", "TRUST_DOMAIN", "SPIFFE trust domain"),
    ("--network", "NETWORK", "network of this node"),
    ("--secret-ttl", "SECRET_TTL", "workload certificate lifetime, e.g. 24h"),
    ("--pool-max-streams-per-connection", "POOL_MAX_STREAMS_PER_CONNECTION", "streams per pooled HBONE connection"),
    ("--pool-unused-release-timeout", "POOL_UNUSED_RELEASE_TIMEOUT", "idle pooled connection lifetime, e.g. 5m"),
    ("--http2-stream-window-size", "HTTP2_STREAM_WINDOW_SIZE", "bytes"),
    ("--http2-connection-window-size", "HTTP2_CONNECTION_WINDOW_SIZE", "bytes"),
    ("--http2-frame-size", "HTTP2_FRAME_SIZE", "bytes"),
    ("--worker-threads", "ZTUNNEL_WORKER_THREADS", "native engine worker threads"),
    ("--engine", "ZTUNNEL_ENGINE", "auto, native or pure"),
    ("--fast-path", "ZTUNNEL_FAST_PATH", "true: native workers accept 15001 and serve cached outbound flows"),
    ("--fast-path-handover-rate", "ZTUNNEL_FAST_PATH_HANDOVER_RATE",
     "handovers/s of a flow class at which a worker gets its own HBONE connection (0: never)"),
    ("--fast-path-batch-window", "ZTUNNEL_FAST_PATH_BATCH_WINDOW",
     "fast-path completions taken in batches this far apart, e.g. 5ms (0: at once)"),
    ("--node-local-fast-path", "NODE_LOCAL_FAST_PATH", "true: same-node traffic skips TLS (shared mode)"),
    ("--enable-orig-src", "ENABLE_ORIG_SRC", "true: dial apps with the client's source IP"),
    ("--log-level", "RUST_LOG", "e.g. info or ztunnel_fast::proxy=debug,info"),
    ("--log-format", "LOG_FORMAT", "text or json"),
    # in-pod mode (istio-cni over ZDS)
    ("--inpod-enabled", "INPOD_ENABLED", "true: shared mode serves the pods istio-cni hands over (in-pod mode)"),
    ("--inpod-uds", "INPOD_UDS", "istio-cni's ZDS socket (default /var/run/ztunnel/ztunnel.sock); enables in-pod"),
    ("--redirection", "ZTUNNEL_REDIRECTION", "node: install the node rules, keep ipset ztunnel-pods-ips from the state"),
    # The rest of Config's variables (ISTIO_META_CLUSTER_ID is CLUSTER_ID's fallback: --cluster-id).
    ("--local-xds", "LOCAL_XDS", "the local config inline (YAML); not with --local-xds-path"),
    ("--cluster-domain", "CLUSTER_DOMAIN", "the cluster's DNS domain, e.g. cluster.local"),
    ("--ipv6-enabled", "IPV6_ENABLED", "false: listen on 0.0.0.0 only"),
    ("--connect-timeout", "CONNECT_TIMEOUT", "upstream TCP connect timeout, e.g. 10s"),
    ("--packet-mark", "PACKET_MARK", "SO_MARK on sockets toward workloads"),
    ("--no-extensions", "ZTUNNEL_NO_EXTENSIONS", "true: the pure engine even when the native one is built"),
    ("--authz-policy-info-logging", "AUTHZ_POLICY_INFO_LOGGING", "true: policy decisions at info"),
    ("--termination-grace-period-seconds", "TERMINATION_GRACE_PERIOD_SECONDS", "drain deadline source, e.g. 30"),
    ("--connection-termination-deadline", "CONNECTION_TERMINATION_DEADLINE", "drain deadline, e.g. 5s"),
    # joining a mesh (istiod) and this proxy's own pod (downward API in the chart)
    ("--xds-address", "XDS_ADDRESS", "istiod's xDS, host:port (https:// assumed); used without a local config"),
    ("--ca-address", "CA_ADDRESS", "istiod's CA, host:port (https:// assumed); used without LOCAL_CA_DIR"),
    ("--auth-token", "AUTH_TOKEN", "bearer token for istiod: a file (re-read per use) or the token itself"),
    ("--pod-name", "POD_NAME", "this proxy's pod name (xDS node id)"),
    ("--pod-namespace", "POD_NAMESPACE", "this proxy's pod namespace (xDS node id)"),
    ("--instance-ip", "INSTANCE_IP", "this proxy's pod IP (xDS node id and INSTANCE_IPS)"),
    ("--service-account", "SERVICE_ACCOUNT", "this proxy's service account"),
    ("--tls-handshake-timeout", "TLS_HANDSHAKE_TIMEOUT", "15008: time from accept to a verified peer, e.g. 10s"),
    ("--max-pending-tls-handshakes", "MAX_PENDING_TLS_HANDSHAKES", "15008: unauthenticated connections at once"),
]


def _fail(exc: Exception) -> None:
    click.echo(f"ztunnel-fast: error: {exc}", err=True)
    sys.exit(2)


class _LazyGroup(click.Group):
    """A group whose `lazy` subcommands are imported only when used (click's documented lazy
    loading pattern): `run` never loads the `redirect` group's modules (~0.4 MiB of idle RSS)."""

    lazy: ClassVar[dict[str, str]] = {"redirect": "ztunnel_fast.redirect.cli:redirect"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            module, attr = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ztunnel-fast")
def main() -> None:
    """A per-node zero-trust tunnel for Istio ambient mesh."""


def _run_command():
    @click.command("run", help="Run the proxy (settings from ztunnel's environment variables or these flags).")
    def run(**flags):
        env = dict(os.environ)
        for flag, var, _ in RUN_FLAGS:
            value = flags.get(flag.lstrip("-").replace("-", "_"))
            if value is not None:
                env[var] = value
        from .run import run as run_proxy

        run_proxy(env)

    for flag, var, text in reversed(RUN_FLAGS):
        run = click.option(flag, default=None, metavar=var, help=f"{text} [env {var}]")(run)
    return run


main.add_command(_run_command())


@main.group()
def ca() -> None:
    """The built-in local CA, for running without istiod."""


@ca.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--force", is_flag=True, help="replace an existing root")
def ca_init(directory: Path, trust_domain: str, force: bool) -> None:
    """Write a root key and certificate to DIRECTORY (use it as LOCAL_CA_DIR)."""
    from .identity.ca import init_ca

    try:
        init_ca(directory, trust_domain=trust_domain, force=force)
    except (IdentityError, OSError) as exc:
        _fail(exc)
    click.echo(f"wrote {directory / 'root-cert.pem'} and {directory / 'root-key.pem'} (trust domain {trust_domain})")


@main.command()
@click.option("--engine", type=click.Choice(["auto", "native", "pure"]), default="auto", show_default=True)
@click.option("--keep", is_flag=True, help="leave the topology up for exploring")
@click.option("--step", default=None, metavar="NAME",
              help="run one step: before, label, after, logs, proxy-config, ipset, iptables, scale "
                   "(--mode inpod: before, enable, after, logs, workload-state, remove, cni-restart)")
@click.option("--mode", type=click.Choice(["node", "inpod"]), default="node", show_default=True,
              help="node: node-level redirection; inpod: istio-cni (a double) hands pods over ZDS")
def demo(engine: str, keep: bool, step: str | None, mode: str) -> None:
    """The user guide's ambient journey on one machine: nodes and pods as network namespaces,
    one ztunnel-fast per node, redirection, curl before and after ambient, logs, tables, scaling.
    Needs root; everything is torn down at the end."""
    if mode == "inpod":
        from .demo.inpod_journey import run_inpod_demo

        sys.exit(run_inpod_demo(engine=engine, keep=keep, step=step))
    from .demo.journey import run_demo

    sys.exit(run_demo(engine=engine, keep=keep, step=step))


@main.command("proxy-config")
@click.argument("kind", type=click.Choice(["workloads", "services", "secrets", "all"]))
@click.option("--admin", default="localhost:15000", show_default=True, help="ztunnel-fast admin address HOST:PORT")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def proxy_config(kind: str, admin: str, output: str) -> None:
    """Show what a ztunnel-fast knows: workloads, services, certificates (secrets), or all (istioctl's tables)."""
    from .admin.proxy_config import fetch_config_dump, render

    try:
        dump = fetch_config_dump(admin)
    except OSError as exc:
        _fail(f"cannot read http://{admin}/config_dump: {exc}")
    click.echo(render(kind, dump, output))


@main.command()
def version() -> None:
    """Print the version and which engine is available."""
    from .engine import native_available

    ok, why = native_available()
    click.echo(f"ztunnel-fast {__version__}; native engine: {'built' if ok else 'not built (' + why + ')'}")


if __name__ == "__main__":
    main()
