"""In-process micro-benchmarks: figures that need no network, measured in the harness process.

This is the place for ztunnel's own `benches/` shapes that are pure functions, first of all the
**policy decision cost with 10,000 policies** (ztunnel `benches/throughput.rs` group `rbac`:
`assert_rbac` over 10,000 policies) once L4 authorization lands.  To add one:

    @micro("policy_decision_10k", "policy decision, 10,000 policies", "us/decision")
    def policy_decision_10k(quick: bool) -> float:
        store = ...  # build 10,000 AuthorizationPolicies (ztunnel_fast.state.policy)
        conn = ...   # one connection tuple that matches the last policy (worst case)
        n = 1_000 if quick else 10_000
        t0 = time.perf_counter(); [store.decide(conn) for _ in range(n)]
        return (time.perf_counter() - t0) / n * 1e6

Registered functions run after the network setups (`python -m bench --micro-only` runs just
these); their results go to the JSON under "micro" and to a second table.  Keep loops bounded by a
count, never by a time target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Micro:
    key: str
    label: str
    unit: str
    fn: Callable[[bool], float]


REGISTRY: dict[str, Micro] = {}


def micro(key: str, label: str, unit: str):
    def register(fn: Callable[[bool], float]) -> Callable[[bool], float]:
        REGISTRY[key] = Micro(key, label, unit, fn)
        return fn

    return register


def run_all(quick: bool) -> dict:
    """{key: {"label", "unit", "value" | "error", "seconds"}} for every registered micro-benchmark."""
    out = {}
    for m in REGISTRY.values():
        t0 = time.monotonic()
        try:
            out[m.key] = {"label": m.label, "unit": m.unit, "value": m.fn(quick)}
        except Exception as exc:  # noqa: BLE001 - one failing micro-benchmark must not hide the others
            out[m.key] = {"label": m.label, "unit": m.unit, "error": f"{type(exc).__name__}: {exc}"}
        out[m.key]["seconds"] = round(time.monotonic() - t0, 3)
    return out
