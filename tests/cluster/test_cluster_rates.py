"""rpm 600 across three hosts (issue 13): one key limited to 600 requests a minute, its traffic
skewed 6:3:1 over hosts A, B and C at 20 requests a second (1,200 a minute offered: A alone
asks for more than the whole limit, C for less than a third of it).

The bound is the one `tokenhub.runtime.shares` states: each host's local rpm limit is its share
r_i, a GCRA bucket whose fill fraction is kept when r_i changes, raises applied a tick after
cuts, so over any window of 60 s the hosts together admit at most

    B0 + R + sum of D_k

B0 being what their buckets held at the window's start and D_k the share moved onto a host by
rebalance k within the window. The test reads both off the hosts' own quota tables every 0.2 s
(`RateSampler`: each host's local limit and bucket) and checks every 60 s window starting at a
sample, plus EDGE per host (the floor of a sampled bucket, and the client's send time standing
in for the server's admission time).

The issue asks for 3 minutes: RPM_SHARED_S, the run with Redis, is 180 s (its first minute
starts from full buckets; the windows starting a minute in show the steady state), and
TOKENHUB_CLUSTER_RPM_S overrides it for a quicker look (at least 61 s). Then Redis is stopped
for RPM_STATIC_S more: every host falls back to the static share floor(600 / 3) = 200 within a
tick, and every window starting FALLBACK_S after the stop admits at most 600 (plus EDGE per
host). The admitted requests are also held to the usage oracles (billed exactly once).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest
from cluster_kit import (
    Cluster,
    Load,
    RateSampler,
    Window,
    money_problems,
    usage_problems,
    windows,
)

pytestmark = pytest.mark.cluster

RPM = 600
RPM_SHARED_S = float(os.environ.get("TOKENHUB_CLUSTER_RPM_S", "180"))  # the 3 minutes
RPM_STATIC_S = 70.0  # then Redis stopped: room for whole windows after the fallback
RPM_TEST_S = RPM_SHARED_S + RPM_STATIC_S
OFFERED_PER_S = 20
SKEW = {"A": 6, "B": 3, "C": 1}
EDGE = 2  # per host and window, see the module docstring
FALLBACK_S = 2.0  # a host finds Redis gone at its next tick (1 s) and cuts to 200 at once


def summary(ws: list[Window]) -> dict[str, int]:
    worst = max(ws, key=lambda w: w.admitted - w.bound(RPM, 0))
    return {
        "windows": len(ws),
        "admitted_min": min(w.admitted for w in ws),
        "admitted_max": max(w.admitted for w in ws),
        "worst_admitted": worst.admitted,
        "worst_bucket": worst.bucket,
        "worst_moved": worst.moved,
    }


@pytest.mark.timeout(int(RPM_TEST_S) + 300)
def test_rpm_600_across_three_hosts(cluster: Cluster) -> None:
    shared_s = RPM_SHARED_S
    assert shared_s >= 61, "TOKENHUB_CLUSTER_RPM_S leaves no whole window with Redis"
    tenant = cluster.add_tenant("rated", "100.00", key_rpm=RPM)
    cluster.start()
    load = Load(cluster)
    try:
        sampler = RateSampler(cluster, load, f"key:{tenant.key_id}").start()
        try:
            steady = load.steady(tenant, OFFERED_PER_S, RPM_TEST_S, SKEW, max_in_flight=64)
            time.sleep(max(0.0, shared_s - load.now()))
            cluster.services.redis.stop()
            stopped_at = load.now()
            steady.result(RPM_TEST_S + 120)
        finally:
            sampler.stop()
        shots = load.of(tenant)
        pools = cluster.quiesce({s.request_id for s in shots if s.status == 200 and s.request_id})
        books = cluster.books()
    finally:
        load.close()

    shared = windows(sampler.samples, shots, 0.0, stopped_at)
    static = windows(sampler.samples, shots, stopped_at + FALLBACK_S, RPM_TEST_S)
    statuses = Counter(s.status for s in shots)
    per_minute = Counter(
        int(s.sent // 60) for s in shots if s.status == 200 and not s.code and not s.error
    )
    last = sampler.samples[-1]
    before_stop = [s for s in sampler.samples if s.t < stopped_at][-1]
    figures = {
        "requests": len(shots),
        "statuses": dict(statuses),
        "admitted_per_minute_from_start": [per_minute[m] for m in sorted(per_minute)],
        "with_redis": summary(shared),
        "with_redis_after_first_minute": summary([w for w in shared if w.start >= 60])
        if shared_s >= 120
        else {},
        "redis_stopped": summary(static),
        "shares_before_stop": before_stop.limit,
        "shares_at_end": last.limit,
        "admitted_by_host": dict(
            Counter(s.host for s in shots if s.status == 200 and not s.code and not s.error)
        ),
    }
    print(f"\n[cluster figures] rpm {RPM} x 3 hosts: {json.dumps(figures, sort_keys=True)}")

    assert set(statuses) <= {200, 429}, statuses
    assert not [s for s in shots if s.error or (s.status == 200 and s.code)]
    problems = usage_problems(books, shots)
    assert not problems, "\n".join(problems[:40])
    assert not money_problems(books, [tenant])
    assert not pools, pools

    over = [w for w in shared if w.admitted > w.bound(RPM, EDGE * len(SKEW))]
    assert not over, f"windows over B0 + R + moved: {over[:5]}"
    assert static, "no whole window with Redis stopped"
    over = [w for w in static if w.admitted > RPM + EDGE * len(SKEW)]
    assert not over, f"windows over {RPM} with static shares: {over[:5]}"
    assert all(v == RPM // len(SKEW) for v in last.limit.values()), last.limit
    # The limit is enforced, and the busy host is not starved by the static split alone.
    assert statuses[429] > 0
