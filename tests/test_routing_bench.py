"""bench-routing: the trace loaders, the scenario schema, the simulator (hand-built traces with
known answers, and slices of the real traces through the real Router), the quality track and
the CLI.

Hand-built cases drive the simulator with `Scripted`, a test double that always offers the same
order: it is not a routing policy, it pins the decision so the engine's arithmetic can be checked.
Everything policy-shaped goes through `tokenhub.router.Router`.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tokenhub.cli import main
from tokenhub.routing_bench import quality
from tokenhub.routing_bench.bench import load_requests, run_policy
from tokenhub.routing_bench.metrics import PolicyReport, percentile
from tokenhub.routing_bench.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from tokenhub.routing_bench.sim import Outcome, SimResult, shape_load
from tokenhub.routing_bench.traces import Request, TraceError, load_trace

ROOT = Path(__file__).resolve().parents[1]
# The shared traces live beside the repository (../shared/traces); TOKENHUB_TRACES points
# elsewhere. They are not copied into the repo (see their README).
TRACES = Path(os.environ.get("TOKENHUB_TRACES") or ROOT.parent / "shared" / "traces")
AZURE_CONV = TRACES / "AzureLLMInferenceTrace_conv_2023.csv"
AZURE_CODE = TRACES / "AzureLLMInferenceTrace_code_2023.csv"
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
OUTCOMES = TRACES / "router_outcomes"
EXAMPLES = ROOT / "examples" / "routing"

if not TRACES.is_dir() and os.environ.get("TOKENHUB_REQUIRE_TRACES"):
    raise RuntimeError(
        f"the shared traces are not at {TRACES} (set TOKENHUB_TRACES): CI runs these tests"
    )
needs_traces = pytest.mark.skipif(
    not TRACES.is_dir(), reason=f"no shared traces at {TRACES} (set TOKENHUB_TRACES)"
)


class _Decision:
    def __init__(self, order: tuple[int, ...]) -> None:
        self.order = order
        self.reason = "policy"


class Scripted:
    """Offers the same order for every request and records what the simulator reports."""

    def __init__(self, order: tuple[int, ...]) -> None:
        self.order = order
        self.events: list[tuple[Any, ...]] = []

    def choose(self, now_ms: int, tokens: int, affinity: int | str | None) -> _Decision:
        self.events.append(("choose", now_ms, tokens, affinity))
        return _Decision(self.order)

    def on_start(self, i: int, now_ms: int, tokens: int) -> None:
        self.events.append(("start", i, now_ms))

    def on_success(self, i: int, now_ms: int, latency_ms: int, ttft_ms: int) -> None:
        self.events.append(("success", i, now_ms, latency_ms, ttft_ms))

    def on_failure(self, i: int, now_ms: int) -> None:
        self.events.append(("failure", i, now_ms))


def _scripted(order: tuple[int, ...]) -> Any:
    return lambda sc, policy: Scripted(order)


def _run(
    sc: Scenario, reqs: list[Request], order: tuple[int, ...]
) -> tuple[PolicyReport, SimResult]:
    return run_policy(sc, reqs, "scripted", factory=_scripted(order))


def _conserved(rep: PolicyReport, res: SimResult) -> None:
    c = rep.conservation
    assert c.ok
    assert c.arrivals == len(res.requests) == c.served + c.rejected + c.failed
    assert all(o in (Outcome.SERVED, Outcome.REJECTED, Outcome.FAILED) for o in res.outcome)
    served = [r for r, o in zip(res.requests, res.outcome, strict=True) if o == Outcome.SERVED]
    billed_in = sum(d.input_tokens for d in rep.deployments)
    billed_out = sum(d.output_tokens for d in rep.deployments)
    assert billed_in == sum(r.input_tokens for r in served)
    assert billed_out == sum(r.output_tokens for r in served)
    assert c.trace_input_tokens == sum(r.input_tokens for r in res.requests)
    assert rep.cost_nanos == sum(res.cost_nanos) == sum(d.cost_nanos for d in rep.deployments)


ONE = """
name = "one"
[slo]
ttft_ms = 150
e2e_ms = 1000
[[deployments]]
name = "solo"
input_per_1m = "1"
output_per_1m = "2"
ttft_ms = 100
output_tps = 10
max_concurrency = 1
queue_limit = 1
"""


# --- hand-built traces with known answers ----------------------------------------------------


def test_slo_latency_and_queueing_on_a_hand_built_trace() -> None:
    sc = parse_scenario(ONE)
    reqs = [
        Request(0, 1000, 5),  # served at once: TTFT 100, E2E 100 + 500 = 600
        Request(0, 1000, 1),  # queued behind it: starts at 600, TTFT 700, E2E 800
        Request(0, 1000, 1),  # the queue (limit 1) is full: rejected
        Request(2000, 2000, 20),  # idle again: TTFT 100, E2E 2100
    ]
    rep, res = _run(sc, reqs, (0,))
    assert res.outcome == ["served", "served", "rejected", "served"]
    assert res.ttft_ms == [100, 700, None, 100]
    assert res.e2e_ms == [600, 800, None, 2100]
    assert res.queue_wait_ms == [0, 600, 0, 0]
    # SLO: TTFT <= 150 and E2E <= 1000 holds for request 0 only, out of 4 arrivals.
    assert rep.slo_attainment == 0.25
    assert rep.ttft_ms == {"p50": 100, "p95": 700, "p99": 700}
    assert rep.e2e_ms["p50"] == 800
    assert rep.conservation.rejected == 1 and rep.retries == 0
    # Served: 4,000 input at 1 per 1M + 26 output at 2 per 1M, in nanos: 4,000,000 + 52,000.
    assert rep.cost_nanos == 4_052_000
    assert rep.deployments[0].max_queue == 1
    _conserved(rep, res)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([float(x) for x in range(1, 101)], 95) == 95.0
    assert percentile([5.0], 99) == 5.0


def test_prompt_cache_hits_on_shared_prefixes() -> None:
    sc = parse_scenario(
        """
[[deployments]]
name = "c"
input_per_1m = "1.00"
cached_input_per_1m = "0.10"
output_per_1m = "0"
ttft_ms = 100
prefill_ms_per_1k = 100
output_tps = 1000
cache_blocks = 8
"""
    )
    reqs = [
        Request(0, 1536, 1, (1, 2, 3)),  # cold: nothing cached
        Request(1000, 1400, 1, (1, 2, 4)),  # blocks 1, 2 seen: 1,024 tokens cached
        Request(2000, 300, 1, (5,)),  # a different prefix: cold
        Request(3000, 1000, 1, (1, 9)),  # block 1 only: 512 cached (9 is new)
        Request(4000, 400, 1, (1,)),  # block 1 covers more than the prompt: 400 cached
    ]
    rep, res = _run(sc, reqs, (0,))
    assert res.cached_tokens == [0, 1024, 0, 512, 400]
    total_in = 1536 + 1400 + 300 + 1000 + 400
    assert rep.cache_hit_share == pytest.approx((1024 + 512 + 400) / total_in)
    # Cached blocks skip prefill: 100 ms base + 100 ms per 1k uncached tokens.
    assert res.ttft_ms[0] == pytest.approx(100 + 153.6)
    assert res.ttft_ms[1] == pytest.approx(100 + 37.6)
    # Cached tokens are billed at the cached price: 1M in nanos per token is 1,000 vs 100.
    assert res.cost_nanos[1] == (1400 - 1024) * 1000 + 1024 * 100
    _conserved(rep, res)


def test_prompt_cache_is_a_bounded_lru() -> None:
    sc = parse_scenario('[[deployments]]\nname = "c"\ncache_blocks = 2\n')
    reqs = [
        Request(0, 1024, 1, (1, 2)),
        Request(1000, 1024, 1, (3, 4)),  # evicts 1 and 2
        Request(2000, 1024, 1, (1, 2)),
    ]
    _, res = _run(sc, reqs, (0,))
    assert res.cached_tokens == [0, 0, 0]


def test_failure_window_retries_on_the_next_deployment() -> None:
    sc = parse_scenario(
        """
[[deployments]]
name = "a"
error_ms = 50
failures = [{ start_s = 1, end_s = 2, kind = "error" }]
[[deployments]]
name = "b"
[[deployments]]
name = "c"
timeout_ms = 3000
failures = [{ start_s = 0, end_s = 10, kind = "timeout" }]
"""
    )
    reqs = [Request(t, 100, 10) for t in range(0, 3000, 100)]
    rep, res = _run(sc, reqs, (0, 1))
    in_window = [k for k, r in enumerate(reqs) if 1000 <= r.arrival_ms < 2000]
    assert rep.retries == len(in_window) == 10
    assert rep.conservation.failed == 0
    assert {res.deployment[k] for k in in_window} == {1}
    assert rep.deployments[0].failures == 10
    # The failed attempt costs error_ms before the retry.
    assert res.ttft_ms[in_window[0]] == pytest.approx(50 + 200)
    # With no deployment left to try, the request fails (after c's timeout).
    rep2, res2 = _run(sc, reqs[:3], (2,))
    assert res2.outcome == ["failed"] * 3 and rep2.conservation.failed == 3
    _conserved(rep, res)
    _conserved(rep2, res2)


def test_rpm_limit_refuses_and_falls_back() -> None:
    sc = parse_scenario('[[deployments]]\nname = "a"\nrpm = 3\n[[deployments]]\nname = "b"\n')
    reqs = [Request(t, 10, 1) for t in range(0, 1000, 100)]
    rep, res = _run(sc, reqs, (0, 1))
    assert [res.deployment[k] for k in range(10)] == [0, 0, 0] + [1] * 7
    assert rep.deployments[0].refusals == 7 and rep.retries == 7
    # A minute later the window has moved on.
    rep, res = _run(sc, [*reqs, Request(61_000, 10, 1)], (0, 1))
    assert res.deployment[-1] == 0


def test_burst_replicates_arrivals_inside_the_window() -> None:
    reqs = [Request(t, 100, 10) for t in range(0, 10_000, 1000)]
    shaped = shape_load(reqs, 1.0, parse_scenario(BURSTY).load.burst)
    # Requests at 2, 3 and 4 s get two copies each, spread over the next second.
    assert len(shaped) == 10 + 3 * 2
    assert [r.arrival_ms for r in shaped if 2000 <= r.arrival_ms < 3000] == [2000, 2333, 2666]
    fast = shape_load(reqs, 2.0, None)
    assert [r.arrival_ms for r in fast][:3] == [0, 500, 1000]


BURSTY = """
[load]
burst = { start_s = 2, end_s = 5, factor = 3 }
[[deployments]]
name = "a"
ttft_ms = 100
output_tps = 20
max_concurrency = 2
queue_limit = 100
"""


def test_burst_increases_queueing() -> None:
    sc = parse_scenario(BURSTY)
    reqs = [Request(t, 100, 10) for t in range(0, 10_000, 400)]
    calm = parse_scenario(BURSTY.replace("factor = 3", "factor = 1"))
    rep_calm, _ = _run(calm, shape_load(reqs, 1.0, calm.load.burst), (0,))
    rep_burst, res = _run(sc, shape_load(reqs, 1.0, sc.load.burst), (0,))
    assert rep_burst.conservation.arrivals > rep_calm.conservation.arrivals
    assert rep_calm.queue_wait_ms["p95"] == 0
    assert rep_burst.queue_wait_ms["p95"] is not None and rep_burst.queue_wait_ms["p95"] > 0
    assert rep_burst.ttft_ms["p99"] > rep_calm.ttft_ms["p99"]  # type: ignore[operator]
    _conserved(rep_burst, res)


# --- scenario schema -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[deployments]]\nname = 'a'\nweight = 'x'\n", "$.deployments[0].weight"),
        ("[[deployments]]\nname = 'a'\nspeed = 3\n", "unknown field `speed`"),
        ("[[deployments]]\nname = 'a'\ninput_per_1m = 0.15\n", 'decimal string ("0.15")'),
        ("[[deployments]]\nname = 'a'\n[[deployments]]\nname = 'a'\n", "duplicate deployment"),
        ("deployments = []\n", "at least one"),
        ("currency = 'XXQ'\n[[deployments]]\nname = 'a'\n", "XXQ"),
        ("[[deployments]]\nname = 'a'\nfailures = [{start_s = 5, end_s = 1}]\n", "start_s < end_s"),
        ("[[deployments]\nname = 'a'\n", "invalid TOML"),
        ("[[deployments]]\nname = 'a'\ninput_per_1m = '0.1234567891'\n", "more than 9 decimals"),
    ],
)
def test_scenario_errors_name_the_file_and_field(text: str, needle: str) -> None:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(text, "bad.toml")
    assert str(e.value).startswith("bad.toml: ")
    assert needle in str(e.value)
    assert "\n" not in str(e.value).strip() or needle == "invalid TOML"


def test_prices_are_exact_nanos() -> None:
    sc = parse_scenario(
        """
currency = "USD"
[[deployments]]
name = "a"
input_per_1m = "0.15"
output_per_1m = 60
[[deployments]]
name = "b"
input_per_1m = "0.000000001"
"""
    )
    assert sc.prices(sc.deployments[0]) == (150_000_000, 150_000_000, 600_000_000)
    assert sc.prices(sc.deployments[1]) == (1, 1, 0)
    jpy = parse_scenario('currency = "JPY"\n[[deployments]]\nname = "a"\ninput_per_1m = 15\n')
    assert jpy.prices(jpy.deployments[0])[0] == 15 * 10**9


def test_examples_parse() -> None:
    names = sorted(p.stem for p in EXAMPLES.glob("*.toml"))
    assert names == ["burst3x", "cheap_vs_fast", "provider_down", "steady"]
    for p in EXAMPLES.glob("*.toml"):
        sc = load_scenario(p)
        assert sc.slo.ttft_ms is not None
        assert "tokenhub bench-routing" in p.read_text()


# --- traces ----------------------------------------------------------------------------------


@needs_traces
def test_trace_loaders() -> None:
    az = load_trace(AZURE_CONV, limit=200)
    assert len(az) == 200 and az[0].arrival_ms == 0
    assert all(a.arrival_ms <= b.arrival_ms for a, b in itertools.pairwise(az))
    assert (az[0].input_tokens, az[0].output_tokens) == (374, 44)
    assert az[1].arrival_ms == 4314  # 18:15:50.995169 - 18:15:46.680590
    assert all(r.affinity is None and not r.hash_ids for r in az)
    mc = load_trace(MOONCAKE, limit=50)
    assert mc[0].hash_ids[:2] == (0, 1) and mc[0].affinity == 1
    assert all(r.affinity == r.hash_ids[1] for r in mc if len(r.hash_ids) > 1)
    window = load_trace(AZURE_CODE, start_s=200, duration_s=30)
    assert window and window[0].arrival_ms == 0 and window[-1].arrival_ms < 30_000


def test_trace_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.csv"):
        load_trace(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n")
    with pytest.raises(TraceError, match="Azure header"):
        load_trace(bad)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    with pytest.raises(TraceError, match=r"bad\.jsonl:1"):
        load_trace(bad)
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(tmp_path / "x.parquet")


# --- the real traces through the real Router -------------------------------------------------

POLICIES = ("swrr", "random", "p2c", "latency", "cheapest", "priority")


@needs_traces
@pytest.mark.parametrize(
    ("trace", "limit"), [(AZURE_CONV, 1500), (AZURE_CODE, 800), (MOONCAKE, 800)]
)
def test_conservation_on_trace_slices(trace: Path, limit: int) -> None:
    sc = load_scenario(EXAMPLES / "provider_down.toml")
    reqs = load_requests(sc, str(trace), limit=limit)
    for policy in POLICIES:
        rep, res = run_policy(sc, reqs, policy)
        _conserved(rep, res)
        assert sum(rep.reasons.values()) == len(reqs)
        if trace == MOONCAKE:
            assert rep.cache_hit_share > 0
        else:
            assert rep.cache_hit_share == 0


@needs_traces
def test_failure_window_shifts_share_through_the_router() -> None:
    down = load_scenario(EXAMPLES / "provider_down.toml")
    steady = load_scenario(EXAMPLES / "steady.toml")
    reqs = load_requests(steady, str(AZURE_CONV), duration_s=300)
    rep_down, res = run_policy(down, reqs, "swrr")
    rep_up, _ = run_policy(steady, reqs, "swrr")
    assert rep_up.retries == 0 and rep_down.retries > 0
    assert rep_down.deployments[0].failures > 0
    assert rep_down.deployments[0].share < rep_up.deployments[0].share
    # While alpha is down (120-180 s), nothing is served by it.
    for r, dep, out in zip(res.requests, res.deployment, res.outcome, strict=True):
        if 125_000 <= r.arrival_ms < 180_000 and out == Outcome.SERVED:
            assert dep != 0
    _conserved(rep_down, res)


@needs_traces
def test_burst_scenario_queues_more_than_steady() -> None:
    steady = load_scenario(EXAMPLES / "steady.toml")
    burst = load_scenario(EXAMPLES / "burst3x.toml")
    rs = load_requests(steady, str(AZURE_CONV), duration_s=400)
    rb = load_requests(burst, str(AZURE_CONV), duration_s=400)
    assert len(rb) > len(rs)
    for policy in ("swrr", "latency"):
        a, _ = run_policy(steady, rs, policy)
        b, res = run_policy(burst, rb, policy)
        assert b.ttft_ms["p99"] > a.ttft_ms["p99"]  # type: ignore[operator]
        assert b.queue_wait_ms["p95"] >= a.queue_wait_ms["p95"]  # type: ignore[operator]
        _conserved(b, res)


# --- quality track ---------------------------------------------------------------------------


@needs_traces
@pytest.mark.parametrize("name", ["gsm8k", "mmlu"])
def test_quality_baselines_on_the_real_tables(name: str) -> None:
    ds = quality.load_dataset(OUTCOMES, name)
    assert ds.dropped > 0
    ref = {"gsm8k": (0.637, 0.858), "mmlu": (0.681, 0.806)}[name]
    assert (round(ds.weak_perf, 3), round(ds.strong_perf, 3)) == ref
    rnd = quality.random_baseline(ds)
    assert rnd.apgr == pytest.approx(0.5, abs=0.02)
    assert rnd.cpt50 == pytest.approx(0.5, abs=0.05)
    length = quality.curve("prompt-length", ds, quality.length_scores(ds))
    assert 0.55 <= length.apgr <= 0.63
    pts = length.points
    assert pts[0].strong_share == 0 and pts[-1].strong_share == 1
    assert pts[0].pgr == 0 and pts[-1].pgr == pytest.approx(1)
    assert pts[0].cost_nanos < pts[-1].cost_nanos


@needs_traces
@pytest.mark.parametrize("name", ["gsm8k", "mmlu"])
def test_tier_defaults_beat_random_on_the_held_out_half(name: str) -> None:
    # The defaults were fitted on the other half (benches/calibrate_tier.py).
    from tokenhub.router import TierScorer

    ds = quality.split(quality.load_dataset(OUTCOMES, name), "heldout")
    scorer = TierScorer()
    scores = [
        scorer.score_text(t, depth=1, prompt_tokens=n)
        for t, n in zip(ds.prompts, ds.prompt_tokens, strict=True)
    ]
    tier = quality.curve("tier", ds, scores)
    assert tier.apgr > quality.random_baseline(ds).apgr + 0.05
    length = quality.curve("prompt-length", ds, quality.length_scores(ds))
    assert tier.apgr > length.apgr - 0.01
    # At the default threshold some calls go strong, and they recover more of the quality gap
    # than random calls would (random recovers its share).
    at = quality.decide(ds, [scorer.tier(s) == "strong" for s in scores], scorer.threshold)
    assert 0.05 < at.strong_share < 0.5
    assert at.pgr > at.strong_share + 0.05


def test_split_halves_are_disjoint_and_deterministic() -> None:
    prompts = [f"question {k}?" for k in range(400)]
    ds = msgspec.structs.replace(_toy([0.0] * 400, [1.0] * 400), prompts=prompts)
    held, fit = quality.split(ds, "heldout"), quality.split(ds, "fit")
    assert set(held.prompts).isdisjoint(fit.prompts)
    assert sorted(held.prompts + fit.prompts) == sorted(prompts)
    assert 150 < len(held.prompts) < 250 and (held.part, fit.part) == ("heldout", "fit")
    rev = quality.split(msgspec.structs.replace(ds, prompts=prompts[::-1]), "heldout")
    assert set(rev.prompts) == set(held.prompts)  # by the prompt, not by the row
    assert quality.split(ds, "all") is ds
    with pytest.raises(quality.QualityError, match="unknown split"):
        quality.split(ds, "test")


def _toy(weak: list[float], strong: list[float]) -> quality.Dataset:
    n = len(weak)
    return quality.Dataset(
        name="toy",
        prompts=[f"p{k}" for k in range(n)],
        weak=weak,
        strong=strong,
        prompt_tokens=[1_000_000] * n,
        weak_tokens=[1_000_000] * n,
        strong_tokens=[1_000_000] * n,
        dropped=0,
        token_counter="test",
    )


def test_apgr_and_cpt_on_known_curves() -> None:
    # Strong is right where weak is wrong on items 0 and 1 only.
    ds = _toy([0, 0, 1, 1], [1, 1, 1, 1])
    oracle = quality.curve("oracle", ds, [4.0, 3.0, 2.0, 1.0])
    assert [p.pgr for p in oracle.points] == [0, 0.5, 1, 1, 1]
    assert oracle.apgr == pytest.approx(0.25 * 0.25 + 0.25 * 0.75 + 0.5)
    assert oracle.cpt50 == 0.25 and oracle.cpt80 == pytest.approx(0.4)
    worst = quality.curve("worst", ds, [1.0, 2.0, 3.0, 4.0])
    assert worst.apgr == pytest.approx(0.25) and worst.cpt50 == pytest.approx(0.75)
    # Ties move together: one step from nothing to everything.
    tied = quality.curve("tied", ds, [1.0] * 4)
    assert [p.strong_share for p in tied.points] == [0, 1] and tied.apgr == 0.5
    # $0.90 and $20 per 1M tokens, 1M tokens a prompt.
    assert oracle.points[0].cost_nanos == 4 * 900_000_000
    assert oracle.points[-1].cost_nanos == 4 * 20_000_000_000


# --- CLI -------------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["bench-routing", "--quiet", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@needs_traces
def test_cli_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    steady = str(EXAMPLES / "steady.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[deployments]\n")
    cases = [
        (["--trace", str(tmp_path / "missing.csv"), "--deployments", steady], "missing.csv"),
        (["--trace", str(AZURE_CONV), "--deployments", str(bad)], "bad.toml: invalid TOML"),
        (["--trace", str(AZURE_CONV), "--deployments", steady, "--policies", "swrr,fastest"],
         "unknown policy 'fastest'"),
        (["--trace", str(AZURE_CONV), "--deployments", str(tmp_path / "x.toml")], "x.toml"),
        (["--deployments", steady], "--trace"),
        (["--quality", "--dataset", "hellaswag", "--outcomes", str(OUTCOMES)], "hellaswag"),
    ]  # fmt: skip
    for argv, needle in cases:
        rc, out, err = _cli(capsys, *argv)
        assert rc == 2, argv
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("tokenhub: error: "), err
        assert needle in err


@needs_traces
def test_cli_json_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "sim.png"
    argv = ["--trace", str(AZURE_CONV), "--deployments", str(EXAMPLES / "cheap_vs_fast.toml"),
            "--policies", "swrr,cheapest,latency", "--limit", "400", "--json"]  # fmt: skip
    has_mpl = _has_matplotlib()
    rc, out, err = _cli(capsys, *argv, *(["--plot", str(png)] if has_mpl else []))
    assert rc == 0, err
    doc = json.loads(out)
    assert [p["policy"] for p in doc["policies"]] == ["swrr", "cheapest", "latency"]
    for p in doc["policies"]:
        assert p["conservation"]["ok"] and p["conservation"]["arrivals"] == 400
        assert isinstance(p["cost_nanos"], int)
    cheapest, latency = doc["policies"][1], doc["policies"][2]
    assert cheapest["cost_nanos"] < latency["cost_nanos"]
    if has_mpl:
        assert png.stat().st_size > 1000
    rc, out, _ = _cli(capsys, *argv[:-1])
    assert rc == 0 and "conservation" in out and "swrr" in out


@needs_traces
def test_cli_quality_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(capsys, "--quality", "--outcomes", str(OUTCOMES), "--dataset", "gsm8k",
                        "--json")  # fmt: skip
    assert rc == 0, err
    doc = json.loads(out)
    gsm8k = doc["datasets"]["gsm8k"]
    assert gsm8k["split"] == "heldout" and 600 < gsm8k["prompts"] < 700
    routers = {r["router"]: r for r in gsm8k["routers"]}
    assert 0.55 <= routers["prompt-length"]["apgr"] <= 0.63
    assert routers["tier"]["apgr"] > routers["random"]["apgr"]
    rc, out, err = _cli(capsys, "--quality", "--outcomes", str(OUTCOMES), "--dataset", "gsm8k",
                        "--split", "all")  # fmt: skip
    assert rc == 0, err
    assert out.startswith("gsm8k (all): 1,307 prompts")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def test_progress_bar_draws_only_on_a_terminal_after_a_second() -> None:
    import io

    from tokenhub.routing_bench.cli import _Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = _Progress("swrr", True, tty)
    bar(10, 100)
    assert tty.getvalue() == ""  # the first second stays silent
    bar.t0 -= 2
    bar(50, 100)
    assert "\rswrr" in tty.getvalue() and "50/100" in tty.getvalue() and "\n" not in tty.getvalue()
    bar.close()
    quiet = Tty()
    off = _Progress("swrr", False, quiet)
    off.t0 -= 2
    off(50, 100)
    pipe = io.StringIO()
    piped = _Progress("swrr", True, pipe)
    piped.t0 -= 2
    piped(50, 100)
    assert quiet.getvalue() == "" and pipe.getvalue() == ""
