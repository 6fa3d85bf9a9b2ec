"""In-process micro-benchmarks: figures that need no network, measured in the harness process.

ztunnel's own `benches/` shapes that are pure functions live here, first of all the policy
decision cost with 10,000 policies (ztunnel's `rbac` group: `assert_rbac` over 10,000 policies).
Register one with `@micro(key, label, unit)`; the function takes `quick` and returns one number.
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


@micro("policy_decision_10k", "policy decision, 10,000 policies", "us/decision")
def policy_decision_10k(quick: bool) -> float:
    """L4 authorization cost (ztunnel's `rbac` bench shape): 10,000 policies over 1,000 namespaces
    plus global and selector policies, a realistic mix of plaintext and mTLS connections."""
    from ztunnel_fast.state.rbac import bench_decision_cost

    result = bench_decision_cost(n_policies=10_000, n_decisions=2_000 if quick else 20_000)
    return result["us_per_decision"]


@micro("policy_index_build_10k", "policy index build, 10,000 policies", "ms")
def policy_index_build_10k(quick: bool) -> float:
    from ztunnel_fast.state.rbac import bench_decision_cost

    return bench_decision_cost(n_policies=10_000, n_decisions=100)["index_build_ms"]
