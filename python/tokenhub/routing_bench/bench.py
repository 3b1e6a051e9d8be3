"""Runs a scenario for each policy: the trace, shaped by the scenario's load, replayed through the
simulator with a fresh `tokenhub.router.Router` per policy."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .metrics import PolicyReport, summarize
from .scenario import Scenario
from .sim import RouterLike, SimResult, Simulator, shape_load
from .traces import Request, load_trace

__all__ = ["RouterFactory", "load_requests", "make_router", "router_policies", "run_policy"]

RouterFactory = Callable[[Scenario, str], RouterLike]


def router_policies() -> tuple[str, ...]:
    from tokenhub.router import POLICIES

    return tuple(POLICIES)


def make_router(sc: Scenario, policy: str) -> RouterLike:
    """The live gateway's Router, configured from the scenario's deployments and [router]
    (see `RouterConfig.share_limits` for the capacity it is told)."""
    from tokenhub.router import DeploymentSpec, Router

    rc = sc.router
    specs = []
    for d in sc.deployments:
        inp, cached, out = sc.prices(d)
        accepts = None if d.max_concurrency is None else d.max_concurrency + d.queue_limit
        specs.append(
            DeploymentSpec(
                name=d.name,
                weight=d.weight,
                priority=d.priority,
                input_per_1m=inp,
                cached_input_per_1m=cached,
                output_per_1m=out,
                rpm=d.rpm if rc.share_limits else None,
                tpm=d.tpm if rc.share_limits else None,
                max_concurrency=accepts if rc.share_limits else None,
            )
        )
    router: RouterLike = Router(
        specs,
        policy=policy,
        seed=rc.seed,
        max_attempts=rc.max_attempts,
        failures_to_trip=rc.failures_to_trip,
        cooldown_ms=rc.cooldown_ms,
        max_cooldown_ms=rc.max_cooldown_ms,
    )
    return router


def load_requests(
    sc: Scenario,
    trace: str,
    *,
    limit: int | None = None,
    duration_s: float | None = None,
    speed: float | None = None,
) -> list[Request]:
    """The trace slice the scenario (or the command line, which wins) asks for, with the
    scenario's load shape applied."""
    ts = sc.trace
    reqs = load_trace(
        trace,
        limit=limit if limit is not None else ts.limit,
        start_s=ts.start_s,
        duration_s=duration_s if duration_s is not None else ts.duration_s,
        affinity_blocks=ts.affinity_blocks,
    )
    return shape_load(reqs, speed if speed is not None else sc.load.speed, sc.load.burst)


def run_policy(
    sc: Scenario,
    requests: Sequence[Request],
    policy: str,
    *,
    factory: RouterFactory = make_router,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[PolicyReport, SimResult]:
    """The report of one policy, and the per-request results it was computed from."""
    router = factory(sc, policy)
    t0 = time.perf_counter()
    res = Simulator(sc, router, progress=progress).run(requests)
    return summarize(policy, sc, res, time.perf_counter() - t0), res
