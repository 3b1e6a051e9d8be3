"""The discrete-event simulator: a trace replayed against simulated deployments, with a Router
choosing where each request goes.

The virtual clock is a float of milliseconds; the router sees it as integer `now_ms`, so the same
Rust code that routes live requests decides here, on simulated time. The simulator asks "which
deployment?" in exactly one place (`Simulator._arrive`: one `router.choose` per request) and then
walks `decision.order`: the first choice, then the router's fallbacks.

Per attempt, at the deployment it is sent to:

1. `router.on_start(i, now, tokens)`.
2. In a failure window the attempt fails after `error_ms` (or `timeout_ms`), holding no slot.
3. Over the deployment's rpm/tpm (sliding 60 s of accepted attempts), or with every slot busy
   and `queue_limit` requests already waiting, the attempt is refused at once (a 429).
4. Otherwise it takes a slot, or waits in the deployment's FIFO queue for one. Service: time to
   first token = `ttft_ms` + `prefill_ms_per_1k` per 1,000 input tokens not in the prompt cache,
   then `output_tokens / output_tps` seconds of decoding.
5. A failure or refusal is reported (`router.on_failure`) and the request moves to the next
   deployment of its order, at once; a success is reported with the attempt's latency and time
   to first token (queueing at that deployment included, as a gateway would measure them).

A request ends `served`, `rejected` (its last attempt was refused for capacity, or the router
offered no deployment) or `failed` (its last attempt failed). Every served request is billed its
trace tokens exactly once: cached prefix tokens at the cached-input price, the rest of the input
at the input price, its output at the output price (integer nanos, `tokenhub.money.rate`).

Prompt cache: a deployment keeps an LRU of `cache_blocks` Mooncake hash blocks. A request's
cached prefix is its leading run of blocks already present (hash ids are prefix-chained, so a
present block means its whole prefix was seen); all its blocks are then marked used. Azure traces
have no blocks, so nothing is ever cached there.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tokenhub.money import rate

from .scenario import Burst, Deployment, Scenario
from .traces import BLOCK_TOKENS, Request

__all__ = [
    "Outcome",
    "RouterLike",
    "SimResult",
    "Simulator",
    "shape_load",
]

WINDOW_MS = 60_000.0  # the rpm/tpm window


class DecisionLike(Protocol):
    @property
    def order(self) -> tuple[int, ...]: ...

    @property
    def reason(self) -> str: ...


class RouterLike(Protocol):
    """What the simulator needs of `tokenhub.router.Router`."""

    def choose(self, now_ms: int, tokens: int, affinity: int | str | None) -> DecisionLike: ...

    def on_start(self, i: int, now_ms: int, tokens: int) -> None: ...

    def on_success(self, i: int, now_ms: int, latency_ms: int, ttft_ms: int) -> None: ...

    def on_failure(self, i: int, now_ms: int) -> None: ...


def shape_load(requests: Sequence[Request], speed: float, burst: Burst | None) -> list[Request]:
    """Applies a burst (replicated arrivals, see `Burst`) and then time compression by `speed`."""
    out: list[Request] = []
    n = len(requests)
    for k, r in enumerate(requests):
        out.append(r)
        if burst is None or burst.factor <= 1:
            continue
        if not burst.start_s * 1000 <= r.arrival_ms < burst.end_s * 1000:
            continue
        nxt = requests[k + 1].arrival_ms if k + 1 < n else r.arrival_ms
        gap = nxt - r.arrival_ms
        for c in range(1, burst.factor):
            t = r.arrival_ms + gap * c // burst.factor
            out.append(Request(t, r.input_tokens, r.output_tokens, r.hash_ids, r.affinity, r.row))
    out.sort(key=lambda r: r.arrival_ms)
    if speed != 1.0:
        out = [
            Request(
                round(r.arrival_ms / speed),
                r.input_tokens,
                r.output_tokens,
                r.hash_ids,
                r.affinity,
                r.row,
            )
            for r in out
        ]
    return out


class Outcome:
    SERVED = "served"
    REJECTED = "rejected"
    FAILED = "failed"


@dataclass(slots=True)
class _Req:
    """A request in flight."""

    idx: int
    req: Request
    order: tuple[int, ...] = ()
    pos: int = 0
    attempts: int = 0
    refused_last: bool = False
    dispatch_ms: float = 0.0  # when the current attempt was sent
    start_ms: float = 0.0  # when it got a slot
    first_token_ms: float = 0.0
    cached_tokens: int = 0


@dataclass(slots=True)
class DeploymentStats:
    served: int = 0
    attempts: int = 0
    failures: int = 0  # failure-window errors and timeouts
    refusals: int = 0  # queue full or over rpm/tpm
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    max_queue: int = 0
    queue_wait_ms: float = 0.0


@dataclass(slots=True)
class _Dep:
    spec: Deployment
    prices: tuple[int, int, int]
    busy: int = 0
    queue: deque[_Req] = field(default_factory=deque)
    window: deque[tuple[float, int]] = field(default_factory=deque)
    window_tokens: int = 0
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    stats: DeploymentStats = field(default_factory=DeploymentStats)


@dataclass(slots=True)
class SimResult:
    """Per-request outcomes (index = position in the replayed request list) and totals."""

    requests: list[Request]
    outcome: list[str]
    deployment: list[int | None]  # who served it
    ttft_ms: list[float | None]
    e2e_ms: list[float | None]
    queue_wait_ms: list[float]
    attempts: list[int]
    cached_tokens: list[int]
    cost_nanos: list[int]
    deployments: list[DeploymentStats]
    reasons: Counter[str]
    virtual_ms: float


_DONE, _FAIL = 0, 1


class Simulator:
    def __init__(
        self,
        scenario: Scenario,
        router: RouterLike,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.router = router
        self.progress = progress
        self._deps = [_Dep(d, scenario.prices(d)) for d in scenario.deployments]
        self._heap: list[tuple[float, int, int, _Req, int]] = []
        self._seq = 0

    def run(self, requests: Sequence[Request]) -> SimResult:
        n = len(requests)
        self._res = SimResult(
            requests=list(requests),
            outcome=[""] * n,
            deployment=[None] * n,
            ttft_ms=[None] * n,
            e2e_ms=[None] * n,
            queue_wait_ms=[0.0] * n,
            attempts=[0] * n,
            cached_tokens=[0] * n,
            cost_nanos=[0] * n,
            deployments=[d.stats for d in self._deps],
            reasons=Counter(),
            virtual_ms=0.0,
        )
        heap = self._heap
        step = max(1, n // 200)
        now = 0.0
        k = 0
        while k < n or heap:
            # Completions at the same instant as an arrival go first: they free slots.
            if heap and (k >= n or heap[0][0] <= requests[k].arrival_ms):
                now, _, kind, st, i = heapq.heappop(heap)
                if kind == _DONE:
                    self._done(st, i, now)
                else:
                    self._failed(st, i, now)
            else:
                now = float(requests[k].arrival_ms)
                self._arrive(_Req(k, requests[k]), now)
                k += 1
                if self.progress is not None and (k % step == 0 or k == n):
                    self.progress(k, n)
        self._res.virtual_ms = now
        return self._res

    def _push(self, t: float, kind: int, st: _Req, i: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, st, i))

    def _arrive(self, st: _Req, now: float) -> None:
        r = st.req
        # The one routing decision per request: order = first choice, then fallbacks.
        d = self.router.choose(
            now_ms=int(now), tokens=r.input_tokens + r.output_tokens, affinity=r.affinity
        )
        self._res.reasons[d.reason] += 1
        st.order = tuple(d.order)
        self._dispatch(st, now)

    def _dispatch(self, st: _Req, now: float) -> None:
        r = st.req
        tokens = r.input_tokens + r.output_tokens
        while st.pos < len(st.order):
            i = st.order[st.pos]
            dep = self._deps[i]
            spec = dep.spec
            self.router.on_start(i, int(now), tokens)
            st.attempts += 1
            dep.stats.attempts += 1
            st.dispatch_ms = now
            window = spec.failure_at(now)
            if window is not None:
                delay = spec.error_ms if window.kind == "error" else spec.timeout_ms
                self._push(now + delay, _FAIL, st, i)
                return
            if self._over_rate(dep, now, tokens) or (
                spec.max_concurrency is not None
                and dep.busy >= spec.max_concurrency
                and len(dep.queue) >= spec.queue_limit
            ):
                dep.stats.refusals += 1
                self.router.on_failure(i, int(now))
                st.refused_last = True
                st.pos += 1
                continue
            dep.window.append((now, tokens))
            dep.window_tokens += tokens
            if spec.max_concurrency is None or dep.busy < spec.max_concurrency:
                self._start(st, i, now)
            else:
                dep.queue.append(st)
                dep.stats.max_queue = max(dep.stats.max_queue, len(dep.queue))
            return
        self._finish(st, Outcome.REJECTED if st.refused_last or not st.order else Outcome.FAILED)

    def _over_rate(self, dep: _Dep, now: float, tokens: int) -> bool:
        spec = dep.spec
        if spec.rpm is None and spec.tpm is None:
            return False
        w = dep.window
        while w and w[0][0] <= now - WINDOW_MS:
            dep.window_tokens -= w.popleft()[1]
        if spec.rpm is not None and len(w) + 1 > spec.rpm:
            return True
        return spec.tpm is not None and dep.window_tokens + tokens > spec.tpm

    def _start(self, st: _Req, i: int, now: float) -> None:
        dep = self._deps[i]
        spec = dep.spec
        r = st.req
        dep.busy += 1
        st.start_ms = now
        wait = now - st.dispatch_ms
        dep.stats.queue_wait_ms += wait
        self._res.queue_wait_ms[st.idx] += wait
        hits = 0
        if spec.cache_blocks and r.hash_ids:
            cache = dep.cache
            for h in r.hash_ids:
                if h not in cache:
                    break
                hits += 1
            for h in r.hash_ids:
                cache[h] = None
                cache.move_to_end(h)
            while len(cache) > spec.cache_blocks:
                cache.popitem(last=False)
        st.cached_tokens = min(hits * BLOCK_TOKENS, r.input_tokens)
        uncached = r.input_tokens - st.cached_tokens
        st.first_token_ms = now + spec.ttft_ms + spec.prefill_ms_per_1k * uncached / 1000
        done = st.first_token_ms + r.output_tokens * 1000 / spec.output_tps
        self._push(done, _DONE, st, i)

    def _done(self, st: _Req, i: int, now: float) -> None:
        dep = self._deps[i]
        dep.busy -= 1
        r = st.req
        self.router.on_success(
            i, int(now), round(now - st.dispatch_ms), round(st.first_token_ms - st.dispatch_ms)
        )
        p_in, p_cached, p_out = dep.prices
        uncached = r.input_tokens - st.cached_tokens
        cost = (
            rate(uncached, p_in) + rate(st.cached_tokens, p_cached) + rate(r.output_tokens, p_out)
        )
        s = dep.stats
        s.served += 1
        s.input_tokens += r.input_tokens
        s.cached_tokens += st.cached_tokens
        s.output_tokens += r.output_tokens
        s.cost_nanos += cost
        res = self._res
        res.deployment[st.idx] = i
        res.ttft_ms[st.idx] = st.first_token_ms - r.arrival_ms
        res.e2e_ms[st.idx] = now - r.arrival_ms
        res.cached_tokens[st.idx] = st.cached_tokens
        res.cost_nanos[st.idx] = cost
        self._finish(st, Outcome.SERVED)
        if dep.queue:
            self._start(dep.queue.popleft(), i, now)

    def _failed(self, st: _Req, i: int, now: float) -> None:
        self._deps[i].stats.failures += 1
        self.router.on_failure(i, int(now))
        st.refused_last = False
        st.pos += 1
        self._dispatch(st, now)

    def _finish(self, st: _Req, outcome: str) -> None:
        self._res.outcome[st.idx] = outcome
        self._res.attempts[st.idx] = st.attempts
