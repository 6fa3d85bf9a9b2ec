"""Apply a :class:`~ztunnel_fast.redirect.rules.RuleSet` with python-iptables (`iptc`), and tell
which iptables backend a network namespace's rules live in.

Role: the only module that writes iptables.  `install` creates our chains (or empties them),
appends the rules, and makes sure each hook jump exists exactly once (and first, where the
ruleset says so); `uninstall` removes every jump to our chains, then the chains.  All changes to a
table go in one commit, so packets see the old rules or the new ones, never a half-written chain.

Invariants:
- python-iptables drives libiptc, i.e. the **legacy** backend, in the **current** network
  namespace.  Callers that target another namespace enter it first (`redirect.nsenter`), in a
  process of their own, before the first table is opened (iptc caches table handles).
- Commits hold ``/run/xtables.lock`` like iptables-legacy does, so a concurrent `iptables -w`
  never races us.
- Only our chains and the jumps into them are ever touched; other software's rules in the same
  built-in chains keep their order and content.
- A namespace whose rules live in iptables-nft is detected (`probe_backends`) and reported by
  `backend_problem` before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .rules import Hook, Opt, Rule, RuleSet

__all__ = [
    "Backends",
    "IptablesError",
    "backend_problem",
    "chain_lines",
    "chains_present",
    "install",
    "list_chain",
    "probe_backends",
    "save_text",
    "uninstall",
]

# python-iptables looks for the xtables extensions through ldconfig when this is unset, which
# fails on some hosts; Debian's path first.
XTABLES_LIBDIRS = ("/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/aarch64-linux-gnu/xtables",
                   "/usr/lib64/xtables", "/usr/lib/xtables", "/usr/libexec/xtables")
XTABLES_LOCK = "/run/xtables.lock"  # iptables-legacy's lock (host-wide, like theirs)
LOCK_WAIT_S = 30.0  # seconds; iptables -w waits without bound, a busy node (tests beside CI load) needs more than 10
COMMIT_TRIES = 3  # EAGAIN: someone committed between our read and our commit
CMD_TIMEOUT_S = 30.0
OURS_RE = re.compile(r"^(ztunnel-|ISTIO_)")  # chain names that mean "redirection installed"


class IptablesError(RuntimeError):
    pass


def _iptc():
    if not os.environ.get("XTABLES_LIBDIR"):
        for d in XTABLES_LIBDIRS:
            if os.path.isdir(d):
                os.environ["XTABLES_LIBDIR"] = d
                break
    try:
        import iptc
    except Exception as exc:  # noqa: BLE001 - XTablesError, OSError from ctypes, ImportError
        raise IptablesError(f"python-iptables cannot load libiptc/libxtables: {exc} "
                            f"(apt-get install iptables; set XTABLES_LIBDIR)") from None
    # iptc probes every table (filter, mangle, raw, nat, security) by opening it whenever a rule
    # gets a non-builtin target, and opening a legacy table makes the kernel create it in this
    # namespace.  Tell it which ones exist, so it never creates tables we do not use.
    for name in iptc.Table.ALL:
        iptc.Table.existing_table_names.setdefault(name, _table_loaded(name))
    return iptc


@contextlib.contextmanager
def _xtables_lock() -> Iterator[None]:
    try:
        fd = os.open(XTABLES_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        # e.g. a read-only root file system without the host's lock file mounted (the chart
        # mounts /run/xtables.lock from the host in node redirection, as kube-proxy does).
        raise IptablesError(f"cannot open the iptables lock {XTABLES_LOCK}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    raise IptablesError(f"another process holds {XTABLES_LOCK} for more than {LOCK_WAIT_S:g}s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------------- building


def _value(opt: Opt) -> str | list[str]:
    if len(opt.values) > 1:
        return (["!"] if opt.negated else []) + list(opt.values)
    value = opt.values[0] if opt.values else ""
    return f"!{value}" if opt.negated else value


def _iptc_rule(iptc, rule: Rule):
    r = iptc.Rule()
    if rule.protocol:
        r.protocol = rule.protocol
    if rule.src:
        r.src = rule.src
    if rule.dst:
        r.dst = rule.dst
    if rule.in_iface:
        r.in_interface = rule.in_iface
    if rule.out_iface:
        r.out_interface = rule.out_iface
    for m in rule.matches:
        match = r.create_match(m.module)
        for opt in m.options:
            match.set_parameter(opt.name, _value(opt))
    target = r.create_target(rule.target)
    for opt in rule.target_options:
        target.set_parameter(opt.name, _value(opt))
    return r


def _jump_rule(iptc, chain: str):
    r = iptc.Rule()
    r.create_target(chain)
    return r


def _is_plain_jump(rule, chain: str) -> bool:
    """`-j chain` with nothing else: the hook we create."""
    return (rule.target is not None and rule.target.name == chain and not rule.matches
            and rule.protocol in ("ip", "all", None, "0")
            and rule.src.startswith("0.0.0.0/") and rule.dst.startswith("0.0.0.0/")
            and not rule.in_interface and not rule.out_interface)


def _commit(table, what: str) -> None:
    last: Exception | None = None
    for _ in range(COMMIT_TRIES):
        try:
            table.commit()
            return
        except Exception as exc:  # noqa: BLE001 - iptc.IPTCError
            last = exc
            time.sleep(0.05)
    raise IptablesError(f"{what}: commit of table {table.name} failed: {last}")


def _open(iptc, name: str):
    try:
        table = iptc.Table(name, autocommit=False)
        table.refresh()  # a cached handle may predate the last commit
    except Exception as exc:  # noqa: BLE001
        raise IptablesError(f"cannot open the legacy iptables table {name}: {exc}") from None
    iptc.Table.existing_table_names[name] = True
    return table


# --------------------------------------------------------------------------------- install/remove


def install(ruleset: RuleSet) -> list[str]:
    """Write `ruleset` (idempotent); returns what changed, in words."""
    iptc = _iptc()
    changes: list[str] = []
    with _xtables_lock():
        for table_name in ruleset.tables():
            table = _open(iptc, table_name)
            try:
                for t, chain in ruleset.chains:
                    if t != table_name:
                        continue
                    if table.is_chain(chain):
                        table.flush_entries(chain)
                    else:
                        table.create_chain(chain)
                        changes.append(f"created chain {table_name} {chain}")
                    for rule in ruleset.rules:
                        if rule.table == table_name and rule.chain == chain:
                            iptc.Chain(table, chain).append_rule(_iptc_rule(iptc, rule))
                for hook in ruleset.hooks:
                    done = _ensure_hook(iptc, table, hook) if hook.table == table_name else None
                    if done:
                        changes.append(f"{done} {table_name} {hook.builtin} -> {hook.chain}")
            except IptablesError:
                raise
            except Exception as exc:  # noqa: BLE001 - iptc raises ValueError/IPTCError/XTablesError
                table.refresh()  # drop the half-made change
                raise IptablesError(f"building table {table_name}: {exc}") from None
            _commit(table, "install")
    return changes


def _ensure_hook(iptc, table, hook: Hook) -> str | None:
    """Exactly one plain jump from the built-in chain to ours (first, if the hook says so).
    Returns what was done: "hooked", "re-hooked" (moved first / duplicates removed) or None."""
    chain = iptc.Chain(table, hook.builtin)
    positions = [i for i, r in enumerate(chain.rules) if _is_plain_jump(r, hook.chain)]
    if positions == [0] if hook.first else len(positions) == 1:
        return None
    for _ in positions:  # duplicates or out of place: remove them all, then add one
        for r in chain.rules:
            if _is_plain_jump(r, hook.chain):
                chain.delete_rule(r)
                break
    if hook.first:
        chain.insert_rule(_jump_rule(iptc, hook.chain), 0)
    else:
        chain.append_rule(_jump_rule(iptc, hook.chain))
    return "re-hooked" if positions else "hooked"


def uninstall(chains: Iterable[tuple[str, str]]) -> list[str]:
    """Remove every jump to `chains` (in any chain of their table), then the chains themselves."""
    iptc = _iptc()
    by_table: dict[str, list[str]] = {}
    for t, c in chains:
        by_table.setdefault(t, []).append(c)
    changes: list[str] = []
    with _xtables_lock():
        for table_name, ours in by_table.items():
            if not _table_loaded(table_name):
                continue  # never instantiate a table just to find it empty
            table = _open(iptc, table_name)
            present = [c for c in ours if table.is_chain(c)]
            if not present:
                continue
            try:
                for chain in table.chains:
                    for _ in range(1000):  # bounded: at most one pass per rule
                        jump = next((r for r in chain.rules if r.target is not None and r.target.name in present), None)
                        if jump is None:
                            break
                        chain.delete_rule(jump)
                        changes.append(f"removed jump {table_name} {chain.name} -> {jump.target.name}")
                for c in present:
                    table.flush_entries(c)
                    table.delete_chain(c)
                    changes.append(f"deleted chain {table_name} {c}")
            except Exception as exc:  # noqa: BLE001
                table.refresh()
                raise IptablesError(f"uninstall in table {table_name}: {exc}") from None
            _commit(table, "uninstall")
    return changes


def _table_loaded(name: str) -> bool:
    try:
        with open("/proc/net/ip_tables_names") as f:
            return name in f.read().split()
    except OSError:
        return True  # unknown: let iptc find out


def chains_present(chains: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Which of `chains` exist (legacy backend, current namespace), without loading tables."""
    text = save_text()
    out = []
    for t, c in chains:
        if f":{c} " in _table_block(text, t):
            out.append((t, c))
    return out


# ------------------------------------------------------------------------------------ reading


def _tool(*argv: str) -> subprocess.CompletedProcess | None:
    if shutil.which(argv[0]) is None:
        return None
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False)


def save_text(backend: str = "legacy") -> str:
    """`iptables-<backend>-save` of the current namespace ('' when the tool is missing)."""
    cp = _tool(f"iptables-{backend}-save")
    return cp.stdout if cp is not None and cp.returncode == 0 else ""


def _table_block(save: str, table: str) -> str:
    m = re.search(rf"^\*{re.escape(table)}\n(.*?)^COMMIT$", save, re.DOTALL | re.MULTILINE)
    return m.group(1) if m else ""


def chain_lines(save: str, table: str, chain: str) -> list[str]:
    """The ``-A chain ...`` lines of one chain in `iptables-save` output, in order."""
    return [line for line in _table_block(save, table).splitlines() if line.startswith(f"-A {chain} ")]


def list_chain(table: str, chain: str) -> str:
    """`iptables-legacy -t <table> -L <chain>`, the listing the guide shows."""
    cp = _tool("iptables-legacy", "-w", "10", "-t", table, "-L", chain)
    if cp is None:
        return "iptables-legacy is not installed\n"
    return cp.stdout if cp.returncode == 0 else cp.stderr


# ------------------------------------------------------------------------------------ backends


@dataclass(frozen=True)
class Backends:
    default: str  # what plain `iptables` is here: "nf_tables", "legacy" or "missing"
    legacy_rules: int  # -A lines in iptables-legacy-save
    nft_rules: int  # -A lines in iptables-nft-save
    nft_ours: tuple[str, ...]  # ztunnel-*/ISTIO_* chains found in the nft backend


def _count_rules(save: str) -> int:
    return sum(1 for line in save.splitlines() if line.startswith("-A "))


def probe_backends() -> Backends:
    """Look at both backends in the current network namespace (read-only)."""
    cp = _tool("iptables", "--version")
    if cp is None:
        default = "missing"
    else:
        default = "nf_tables" if "nf_tables" in cp.stdout else "legacy"
    nft = save_text("nft")
    ours = sorted({line.split()[0][1:] for line in nft.splitlines()
                   if line.startswith(":") and OURS_RE.match(line[1:])})
    return Backends(default, _count_rules(save_text("legacy")), _count_rules(nft), tuple(ours))


def backend_problem(b: Backends, *, allow_nft: bool) -> tuple[str | None, list[str]]:
    """(refusal, warnings) for installing legacy rules given what the backends hold (pure)."""
    warnings: list[str] = []
    if b.nft_ours:
        return (f"redirection chains {', '.join(b.nft_ours)} already exist in the iptables-nft backend "
                f"(see `iptables-nft-save`); ztunnel-fast writes iptables-legacy through python-iptables, "
                f"and both sets would apply: remove the nft ones first (iptables-nft -t <table> -D <builtin> "
                f"-j <chain>; -F <chain>; -X <chain>)"), warnings
    if b.nft_rules:
        msg = (f"this network namespace has {b.nft_rules} iptables rule(s) in the nft backend "
               f"(iptables-nft-save; plain `iptables` here is {b.default}); ztunnel-fast writes its rules "
               f"with python-iptables into the legacy backend (iptables-legacy-save), so packets would cross "
               f"both rule sets")
        if not allow_nft:
            return msg + ": rerun with --allow-nft to install anyway, or move those rules to iptables-legacy", warnings
        warnings.append(msg + " (--allow-nft given: installing anyway)")
    if b.default == "nf_tables":
        warnings.append("plain `iptables` on this host is iptables-nft: inspect ztunnel-fast's rules with "
                        "iptables-legacy / iptables-legacy-save")
    return None, warnings
