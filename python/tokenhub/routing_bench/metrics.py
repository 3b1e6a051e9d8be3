"""What a simulation run measured: latency percentiles, SLO attainment, cost, shares, cache hits,
and the conservation check (every arrival ends served, rejected or failed; billed tokens equal the
trace's tokens of the served requests)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from .scenario import Scenario
from .sim import Outcome, SimResult

__all__ = [
    "Conservation",
    "DeploymentReport",
    "PolicyReport",
    "percentile",
    "summarize",
]


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least p% of values at or below it);
    None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, math.ceil(p / 100 * len(s)))
    return s[k - 1]


class Conservation(msgspec.Struct, kw_only=True):
    arrivals: int
    served: int
    rejected: int
    failed: int
    trace_input_tokens: int  # of every arrival
    trace_output_tokens: int
    served_trace_tokens: int  # input + output of the served requests, from the trace
    billed_tokens: int  # input + output the deployments billed
    ok: bool


class DeploymentReport(msgspec.Struct, kw_only=True):
    name: str
    weight: int
    weight_share: float
    share: float  # of served requests
    served: int
    attempts: int
    failures: int
    refusals: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost_nanos: int
    max_queue: int


class PolicyReport(msgspec.Struct, kw_only=True):
    policy: str
    currency: str
    cost_nanos: int
    ttft_ms: dict[str, float | None]  # p50, p95, p99
    e2e_ms: dict[str, float | None]
    queue_wait_ms: dict[str, float | None]  # mean, p95 (over served requests)
    slo_ttft_ms: float | None
    slo_e2e_ms: float | None
    slo_attainment: float | None  # share of arrivals served within the SLO; None: no SLO set
    retries: int
    cache_hit_share: float  # cached input tokens / input tokens of served requests
    reasons: dict[str, int]
    deployments: list[DeploymentReport]
    conservation: Conservation
    virtual_s: float
    wall_s: float


def _pcts(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{p}": percentile(values, p) for p in (50, 95, 99)}


def summarize(policy: str, sc: Scenario, res: SimResult, wall_s: float) -> PolicyReport:
    n = len(res.requests)
    served = [k for k in range(n) if res.outcome[k] == Outcome.SERVED]
    ttft = [t for t in res.ttft_ms if t is not None]
    e2e = [t for t in res.e2e_ms if t is not None]
    waits = [res.queue_wait_ms[k] for k in served]

    slo_ttft, slo_e2e = sc.slo.ttft_ms, sc.slo.e2e_ms
    attainment: float | None = None
    if slo_ttft is not None or slo_e2e is not None:
        ok = 0
        for k in served:
            t, e = res.ttft_ms[k], res.e2e_ms[k]
            assert t is not None and e is not None
            if (slo_ttft is None or t <= slo_ttft) and (slo_e2e is None or e <= slo_e2e):
                ok += 1
        attainment = ok / n if n else None

    counts = {o: res.outcome.count(o) for o in (Outcome.SERVED, Outcome.REJECTED, Outcome.FAILED)}
    trace_in = sum(r.input_tokens for r in res.requests)
    trace_out = sum(r.output_tokens for r in res.requests)
    served_tokens = sum(
        res.requests[k].input_tokens + res.requests[k].output_tokens for k in served
    )
    billed = sum(d.input_tokens + d.output_tokens for d in res.deployments)
    cons = Conservation(
        arrivals=n,
        served=counts[Outcome.SERVED],
        rejected=counts[Outcome.REJECTED],
        failed=counts[Outcome.FAILED],
        trace_input_tokens=trace_in,
        trace_output_tokens=trace_out,
        served_trace_tokens=served_tokens,
        billed_tokens=billed,
        ok=sum(counts.values()) == n and served_tokens == billed,
    )

    total_w = sum(d.weight for d in sc.deployments) or 1
    n_served = len(served) or 1
    deps = [
        DeploymentReport(
            name=spec.name,
            weight=spec.weight,
            weight_share=spec.weight / total_w,
            share=st.served / n_served,
            served=st.served,
            attempts=st.attempts,
            failures=st.failures,
            refusals=st.refusals,
            input_tokens=st.input_tokens,
            cached_tokens=st.cached_tokens,
            output_tokens=st.output_tokens,
            cost_nanos=st.cost_nanos,
            max_queue=st.max_queue,
        )
        for spec, st in zip(sc.deployments, res.deployments, strict=True)
    ]
    served_in = sum(d.input_tokens for d in res.deployments)
    return PolicyReport(
        policy=policy,
        currency=sc.currency,
        cost_nanos=sum(d.cost_nanos for d in res.deployments),
        ttft_ms=_pcts(ttft),
        e2e_ms=_pcts(e2e),
        queue_wait_ms={
            "mean": sum(waits) / len(waits) if waits else None,
            "p95": percentile(waits, 95),
        },
        slo_ttft_ms=slo_ttft,
        slo_e2e_ms=slo_e2e,
        slo_attainment=attainment,
        retries=sum(a - 1 for a in res.attempts if a > 1),
        cache_hit_share=sum(d.cached_tokens for d in res.deployments) / served_in
        if served_in
        else 0.0,
        reasons=dict(sorted(res.reasons.items())),
        deployments=deps,
        conservation=cons,
        virtual_s=res.virtual_ms / 1000,
        wall_s=wall_s,
    )
