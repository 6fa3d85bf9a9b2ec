"""`ztunnel-fast proxy-config workloads|services|secrets|all`: the guide's istioctl tables from /config_dump.

Rendering is pure (a config dump in, text out); only `fetch_config_dump` does I/O.  Columns and
values follow `istioctl proxy-config` for ztunnel:
    NAME NAMESPACE IP NODE WAYPOINT PROTOCOL
    NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS
    NAME TYPE STATUS VALID CERT SERIAL NUMBER NOT AFTER NOT BEFORE
"""

from __future__ import annotations

import urllib.request
from datetime import datetime, timezone
from typing import Any, Sequence

import orjson

DEFAULT_ADMIN = "localhost:15000"


def fetch_config_dump(admin: str = DEFAULT_ADMIN, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{admin}/config_dump", timeout=timeout) as resp:  # noqa: S310 - local admin
        return orjson.loads(resp.read())


def table(header: Sequence[str], rows: Sequence[Sequence[str]], gap: int = 1) -> str:
    """Left-aligned columns, as Go's tabwriter prints them for istioctl."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w + gap) if i < len(row) - 1 else str(c) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def waypoint_name(waypoint: dict[str, Any] | None, dump: dict[str, Any]) -> str:
    """The WAYPOINT cell, as istioctl words it: the name of the waypoint's service (found by VIP
    "network/ip" or by "namespace/hostname"), `None` without a waypoint, else the destination."""
    if not waypoint:
        return "None"
    destination = waypoint.get("destination", "")
    for svc in dump.get("services", []):
        if destination in svc.get("vips", []) or destination == f"{svc.get('namespace')}/{svc.get('hostname')}":
            return svc["name"]
    return destination or "None"


def workloads_table(dump: dict[str, Any]) -> str:
    rows = []
    for w in sorted(dump.get("workloads", []), key=lambda w: (w["name"], w["namespace"])):
        ips = w.get("workloadIps") or [""]
        waypoint = waypoint_name(w.get("waypoint"), dump)
        rows.append([w["name"], w["namespace"], ips[0], w.get("node") or "", waypoint, w.get("protocol", "TCP")])
    return table(["NAME", "NAMESPACE", "IP", "NODE", "WAYPOINT", "PROTOCOL"], rows)


def services_table(dump: dict[str, Any]) -> str:
    """istioctl's services table; ENDPOINTS is healthy/total."""
    status = {w.get("uid"): w.get("status", "Healthy") for w in dump.get("workloads", [])}
    rows = []
    for s in sorted(dump.get("services", []), key=lambda s: (s["namespace"], s["name"])):
        endpoints = list((s.get("endpoints") or {}).values())
        healthy = sum(1 for ep in endpoints if status.get(ep.get("workloadUid"), "Healthy") == "Healthy")
        vips = s.get("vips") or [""]
        vip = vips[0].rpartition("/")[2]
        rows.append([s["namespace"], s["name"], vip, waypoint_name(s.get("waypoint"), dump),
                     f"{healthy}/{len(endpoints)}"])
    return table(["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"], rows)


def _valid(cert: dict[str, Any], now: datetime) -> str:
    try:
        start = datetime.fromisoformat(cert["validFrom"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(cert["expirationTime"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return "false"
    return "true" if start <= now <= end else "false"


def serial_text(serial_number: str) -> str:
    """The SERIAL NUMBER column as istioctl prints it: config_dump's decimal `serialNumber` parsed
    base 10 and printed with Go's `%x` (lowercase hex, no leading zeros, so a serial whose first
    byte is below 0x10 is shorter than `openssl x509 -serial`'s zero-padded form of the same number).
    A value that is not decimal is shown as given."""
    text = (serial_number or "").strip()
    return format(int(text, 10), "x") if text.isdigit() else text


def secrets_table(dump: dict[str, Any], now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    rows = []
    for entry in sorted(dump.get("certificates", []), key=lambda c: c["identity"]):
        state = entry.get("state", "")
        status = "Available" if state == "Available" else state
        for kind, certs in (("CA", entry.get("rootCerts") or []), ("Cert Chain", entry.get("certChain") or [])):
            if not certs:
                rows.append([entry["identity"], kind, status, "false", "", "", ""])
                continue
            cert = certs[0]
            rows.append([entry["identity"], kind, status, _valid(cert, now), serial_text(cert.get("serialNumber", "")),
                         cert.get("expirationTime", ""), cert.get("validFrom", "")])
    return table(["NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"], rows, gap=5)


def render(kind: str, dump: dict[str, Any], output: str = "table") -> str:
    if output == "json":
        part = dump if kind == "all" else {"workloads": dump.get("workloads", []),
                                            "services": dump.get("services", []),
                                            "secrets": dump.get("certificates", [])}[kind]
        return orjson.dumps(part, option=orjson.OPT_INDENT_2).decode()
    if kind == "workloads":
        return workloads_table(dump)
    if kind == "services":
        return services_table(dump)
    if kind == "secrets":
        return secrets_table(dump)
    return workloads_table(dump) + "\n\n" + services_table(dump) + "\n\n" + secrets_table(dump)
