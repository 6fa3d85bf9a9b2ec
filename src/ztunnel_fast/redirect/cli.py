"""`ztunnel-fast redirect ...`: install, remove and inspect traffic redirection; manage the node's
set of ambient pod IPs.

    ztunnel-fast redirect install [--inpod] [--netns NAME] [--allow-nft]
    ztunnel-fast redirect uninstall [--inpod] [--netns NAME]
    ztunnel-fast redirect status [--inpod] [--netns NAME]        exit 0 when complete, 1 otherwise
    ztunnel-fast redirect add-pod IP | del-pod IP [--netns NAME]
    ztunnel-fast redirect sync --pods FILE --node NODE [--watch [--interval S]] [--netns NAME]

Node mode (default) is for a `shared` ztunnel-fast in the node's network namespace; `--inpod` is
istio-cni's in-pod rules for a `dedicated` ztunnel-fast in a pod's namespace.  `--netns NAME`
runs the command inside ``/run/netns/NAME`` (the process enters it first: python-iptables works on
the namespace of the calling process).  Also runnable as ``python -m ztunnel_fast.redirect.cli``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import click

from . import ipset
from .install import RedirectError, install, status, sync_once, uninstall
from .nsenter import NetnsError, enter
from .rules import RedirectConfig
from .selection import InventoryError, load_inventory

__all__ = ["main", "redirect"]

DEFAULT_PACKET_MARK = 1337  # ztunnel's PACKET_MARK


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"ztunnel-fast: error: {msg}", err=True)
    sys.exit(code)


def _warn(msg: str) -> None:
    click.echo(f"ztunnel-fast: warning: {msg}", err=True)


def _prepare(netns: str | None) -> None:
    """Root check and namespace switch, before anything touches the kernel."""
    if os.geteuid() != 0:
        _fail("redirection needs root (CAP_NET_ADMIN, and CAP_SYS_ADMIN for --netns)")
    if netns:
        try:
            enter(netns)
        except NetnsError as exc:
            _fail(str(exc))


def _config(ipset_name: str, packet_mark: int | None) -> RedirectConfig:
    if packet_mark is None:
        raw = os.environ.get("PACKET_MARK", str(DEFAULT_PACKET_MARK))
        try:
            packet_mark = int(raw, 0)
        except ValueError:
            _fail(f"PACKET_MARK={raw}: not a number")
    try:
        return RedirectConfig(ipset=ipset_name, packet_mark=packet_mark)
    except ValueError as exc:
        _fail(str(exc))
        raise  # unreachable


def _common(f):
    f = click.option("--netns", metavar="NAME", help="run inside network namespace /run/netns/NAME")(f)
    f = click.option("--ipset", "ipset_name", default="ztunnel-pods-ips", show_default=True,
                     help="node mode: the set of ambient pod IPs")(f)
    f = click.option("--packet-mark", type=int, default=None,
                     help="mark on ztunnel-fast's own sockets [default: $PACKET_MARK or 1337]")(f)
    return f


@click.group("redirect", context_settings={"help_option_names": ["-h", "--help"]})
def redirect() -> None:
    """Traffic redirection to ztunnel-fast (iptables TPROXY, ipset, policy routing)."""


@redirect.command("install")
@click.option("--inpod", is_flag=True, help="in-pod rules (Istio >= 1.21) for a dedicated ztunnel-fast in this pod netns")
@click.option("--allow-nft", is_flag=True, help="install even though other rules live in the iptables-nft backend")
@_common
def install_cmd(inpod: bool, allow_nft: bool, netns: str | None, ipset_name: str, packet_mark: int | None) -> None:
    """Install redirection (idempotent)."""
    cfg = _config(ipset_name, packet_mark)
    _prepare(netns)
    try:
        report = install(inpod=inpod, cfg=cfg, allow_nft=allow_nft)
    except RedirectError as exc:
        _fail(str(exc))
    for w in report.warnings:
        _warn(w)
    for c in report.changes:
        click.echo(c)
    click.echo(f"redirection installed ({'in-pod' if inpod else 'node'} mode)")


@redirect.command("uninstall")
@click.option("--inpod", is_flag=True, help="remove the in-pod rules")
@_common
def uninstall_cmd(inpod: bool, netns: str | None, ipset_name: str, packet_mark: int | None) -> None:
    """Remove everything install created (idempotent)."""
    cfg = _config(ipset_name, packet_mark)
    _prepare(netns)
    try:
        report = uninstall(inpod=inpod, cfg=cfg)
    except RedirectError as exc:
        _fail(str(exc))
    for c in report.changes:
        click.echo(c)
    click.echo(f"redirection removed ({'in-pod' if inpod else 'node'} mode)")


@redirect.command("status")
@click.option("--inpod", is_flag=True)
@_common
def status_cmd(inpod: bool, netns: str | None, ipset_name: str, packet_mark: int | None) -> None:
    """Show the ipset, the chains and the policy routing (exit 1 when not fully installed)."""
    cfg = _config(ipset_name, packet_mark)
    _prepare(netns)
    text, complete = status(inpod=inpod, cfg=cfg)
    click.echo(text, nl=False)
    sys.exit(0 if complete else 1)


def _member_cmd(name: str, op, verb: str, help_text: str):
    @redirect.command(name, help=help_text)
    @click.argument("ip")
    @_common
    def cmd(ip: str, netns: str | None, ipset_name: str, packet_mark: int | None) -> None:
        cfg = _config(ipset_name, packet_mark)
        _prepare(netns)
        if not ipset.exists(cfg.ipset):
            _fail(f"ipset {cfg.ipset} does not exist: run `ztunnel-fast redirect install` first")
        try:
            op(cfg.ipset, ip)
        except ipset.IpsetError as exc:
            _fail(str(exc))
        click.echo(f"{verb} {ip}")

    return cmd


_member_cmd("add-pod", ipset.add, "added", "Add one pod IP to the node's ipset (other members untouched).")
_member_cmd("del-pod", ipset.delete, "removed", "Remove one pod IP from the node's ipset (other members untouched).")


@redirect.command("sync")
@click.option("--pods", "pods_file", required=True, type=click.Path(dir_okay=False),
              help="YAML inventory: excludeNamespaces, namespaces (labels), pods (ip, node, annotations)")
@click.option("--node", required=True, help="the node whose ambient pods go into the ipset (NODE_NAME)")
@click.option("--exclude-namespace", "exclude", multiple=True, help="add to the file's excludeNamespaces")
@click.option("--watch", is_flag=True, help="keep polling the file and reconcile on every change")
@click.option("--interval", type=float, default=1.0, show_default=True, help="--watch: seconds between polls")
@_common
def sync_cmd(pods_file: str, node: str, exclude: tuple[str, ...], watch: bool, interval: float,
             netns: str | None, ipset_name: str, packet_mark: int | None) -> None:
    """Apply the guide's pod selection to the ipset: exactly the node's ambient pod IPs."""
    cfg = _config(ipset_name, packet_mark)
    if not 0.05 <= interval <= 3600:
        _fail("--interval must be between 0.05 and 3600 seconds")
    _prepare(netns)
    if not watch:
        try:
            _sync(pods_file, node, exclude, cfg)
        except (InventoryError, RedirectError) as exc:
            _fail(str(exc))
        return
    _watch(pods_file, node, exclude, cfg, interval)


def _sync(pods_file: str, node: str, exclude: tuple[str, ...], cfg: RedirectConfig) -> None:
    report = sync_once(load_inventory(pods_file), node, cfg=cfg, extra_exclude=exclude)
    for w in report.warnings:
        _warn(w)
    for c in report.changes:
        click.echo(c)
    members = ipset.members(cfg.ipset) or set()
    click.echo(f"synced {cfg.ipset}: {len(members)} member(s)", err=False)


RESYNC_S = 30.0  # --watch: reconcile even when the file did not change (someone edited the set)


def _watch(pods_file: str, node: str, exclude: tuple[str, ...], cfg: RedirectConfig, interval: float) -> None:
    """Poll the file until killed; a bad file is reported once and the set is left as it was."""
    last_digest, last_error, last_sync = None, None, 0.0
    click.echo(f"watching {pods_file} for node {node} every {interval:g}s")
    while True:
        try:
            with open(pods_file, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            digest, error = None, f"{pods_file}: cannot read: {exc.strerror}"
        else:
            error = None
        now = time.monotonic()
        if digest is not None and (digest != last_digest or now - last_sync >= RESYNC_S):
            try:
                _sync(pods_file, node, exclude, cfg)
                last_digest, last_sync = digest, now
            except (InventoryError, RedirectError) as exc:
                error = str(exc)
                last_digest = digest  # retried when the file changes, or at the next resync
                last_sync = now
        if error and error != last_error:
            click.echo(f"ztunnel-fast: error: {error} (ipset left unchanged)", err=True)
        last_error = error
        sys.stdout.flush()
        time.sleep(interval)


def main() -> None:
    redirect(prog_name="ztunnel-fast redirect")


if __name__ == "__main__":
    main()
