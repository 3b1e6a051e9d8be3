"""The router and the tier scorer through `tokenhub.router` (mirrors rust/router/tests.rs).

Every test drives the router with an explicit clock (``now_ms``), so nothing here sleeps or
depends on timing; figures are in benches/bench_router.py.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tokenhub import _core
from tokenhub.router import (
    POLICIES,
    REASONS,
    Contract,
    Decision,
    DeploymentSpec,
    Router,
    TierScorer,
)


def abc(policy: str = "swrr", **kw: int) -> Router:
    specs = [DeploymentSpec(name=n, weight=w) for n, w in (("a", 5), ("b", 1), ("c", 1))]
    return Router(specs, policy=policy, **kw)


def fail(r: Router, index: int, now_ms: int, times: int = 3) -> None:
    for _ in range(times):
        r.on_start(index, now_ms)
        r.on_failure(index, now_ms)


def test_policies_match_core() -> None:
    assert POLICIES == ("swrr", "random", "p2c", "latency", "cheapest", "priority")
    assert _core.POLICIES == POLICIES
    for p in POLICIES:
        assert abc(p).policy == p


def test_swrr_exact_sequence() -> None:
    r = abc()
    seq = "".join(r.names[r.choose(0).order[0]] for _ in range(21))
    assert seq == "aabacaa" * 3


def test_swrr_adherence_exact_over_100k() -> None:
    r = abc()
    counts = Counter(r.choose(0).first for _ in range(100_000))
    for i, w in enumerate((5, 1, 1)):
        assert abs(counts[i] - 100_000 * w / 7) <= 1, counts


def test_random_adherence_within_one_percent() -> None:
    r = abc("random", seed=1)
    counts = Counter(r.choose(0).first for _ in range(100_000))
    for i, w in enumerate((5, 1, 1)):
        assert abs(counts[i] / 100_000 - w / 7) < 0.01, counts


def test_determinism() -> None:
    def run(seed: int) -> list[tuple[int, ...]]:
        r = Router([DeploymentSpec(name=str(i)) for i in range(4)], policy="random", seed=seed)
        return [r.choose(t).order for t in range(100)]

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
def test_attempts_bounded_distinct(policy: str, max_attempts: int) -> None:
    specs = [DeploymentSpec(name=f"d{i}", weight=i + 1, priority=i % 2) for i in range(4)]
    r = Router(specs, policy=policy, max_attempts=max_attempts)
    for t in range(100):
        d = r.choose(t, 10)
        assert len(d.order) == len(d) == min(max_attempts, 4)
        assert len(set(d.order)) == len(d.order)
        assert d.reason in REASONS


def test_p2c_prefers_fewer_outstanding() -> None:
    r = Router([DeploymentSpec(name="busy"), DeploymentSpec(name="idle")], policy="p2c")
    for _ in range(4):
        r.on_start(0, 0)
    assert {r.choose(0).order for _ in range(50)} == {(1, 0)}
    assert r.state(0)["outstanding"] == 4
    for _ in range(4):
        r.on_success(0, 1, 10.0)
    assert r.state(0)["outstanding"] == 0


def test_latency_moves_traffic_to_faster() -> None:
    specs = [DeploymentSpec(name="slow"), DeploymentSpec(name="fast")]
    r = Router(specs, policy="latency", seed=5)
    picks = []
    for t in range(2_000):
        i = r.choose(t).first
        r.on_start(i, t)
        r.on_success(i, t, latency_ms=900.0 if i == 0 else 120.0, ttft_ms=50.0)
        picks.append(i)
    assert picks[-1000:].count(1) > 950
    s = r.state(1)
    assert s["latency_ewma_ms"] == pytest.approx(120.0)
    assert s["ttft_ewma_ms"] == pytest.approx(50.0)


def test_cheapest_moves_when_rpm_used_up() -> None:
    specs = [
        DeploymentSpec(name="dear", input_per_1m=3_000_000_000, output_per_1m=15_000_000_000),
        DeploymentSpec(name="cheap", input_per_1m=150_000_000, output_per_1m=600_000_000, rpm=5),
    ]
    r = Router(specs, policy="cheapest")
    for _ in range(5):
        d = r.choose(0)
        assert (d.first, d.reason) == (1, "policy")
        r.on_start(1, 0)
    d = r.choose(0)
    assert (d.order, d.reason) == ((0,), "fallback")
    assert r.state(1, 0)["rpm_used"] == 5
    assert r.choose(11_999).first == 0
    assert r.choose(12_000).first == 1  # one request per 12 s drains back


def test_tpm_and_concurrency_capacity() -> None:
    specs = [
        DeploymentSpec(name="small", tpm=1_000, max_concurrency=2),
        DeploymentSpec(name="b", priority=1),
    ]
    r = Router(specs, policy="priority")
    r.on_start(0, 0, tokens=600)
    assert r.choose(0, tokens=400).first == 0
    assert r.choose(0, tokens=401).order == (1,)  # would overrun the minute's tpm
    assert r.choose(30_000, tokens=700).first == 0  # half the bucket drained
    r.on_start(0, 0, tokens=1)
    assert r.choose(59_000, tokens=1).order == (1,)  # two in flight: full
    r.on_success(0, 59_000, 10.0)
    assert r.choose(59_000, tokens=1).first == 0
    assert (r.state(0, 0)["tpm_used"], r.state(0, 0)["outstanding"]) == (601, 1)


def test_priority_falls_back_and_returns() -> None:
    specs = [
        DeploymentSpec(name="backup", priority=1),
        DeploymentSpec(name="primary", priority=0),
    ]
    r = Router(specs, policy="priority", cooldown_ms=1_000)
    assert [r.choose(t).first for t in range(10)] == [1] * 10
    fail(r, 1, 10)
    d = r.choose(11)
    assert (d.order, d.reason) == ((0,), "fallback")
    d = r.choose(1_010)
    assert (d.order, d.reason) == ((1, 0), "probe")
    r.on_start(1, 1_010)
    r.on_success(1, 1_020, 30.0)
    assert r.choose(1_021).reason == "policy"
    assert r.state(1)["circuit"] == "closed"


def test_circuit_cooldown_probe_doubling() -> None:
    r = abc(cooldown_ms=1_000, max_cooldown_ms=3_000)
    fail(r, 1, 0, times=2)
    assert r.state(1, 0)["circuit"] == "closed"
    fail(r, 1, 0, times=1)
    s = r.state(1, 0)
    assert (s["circuit"], s["cooldown_until"]) == ("open", 1_000)
    assert all(1 not in r.choose(t).order for t in range(0, 1_000, 3))
    assert r.state(1, 1_000)["circuit"] == "half_open"
    d = r.choose(1_000)
    assert (d.first, d.reason) == (1, "probe")
    assert all(1 not in r.choose(1_001).order for _ in range(20))  # one probe at a time
    r.on_failure(1, 1_050)
    assert (r.state(1)["cooldown_ms"], r.state(1)["cooldown_until"]) == (2_000, 3_050)
    assert r.choose(3_050).reason == "probe"
    r.on_failure(1, 3_050)
    assert r.state(1)["cooldown_ms"] == 3_000  # doubled, capped
    assert r.choose(6_050).reason == "probe"
    r.on_success(1, 6_060, 10.0)
    s = r.state(1)
    assert (s["circuit"], s["cooldown_ms"], s["cooldown_until"]) == ("closed", 1_000, None)


def test_cancelled_probe_lets_another_go() -> None:
    r = abc(cooldown_ms=100)
    fail(r, 2, 0)
    assert r.choose(100).reason == "probe"
    assert r.choose(101).reason != "probe"
    r.on_finish(2)
    assert r.choose(102).reason == "probe"


def test_everything_open_is_degraded() -> None:
    r = abc()
    for i, t in ((0, 30), (1, 10), (2, 20)):
        fail(r, i, t)
    d = r.choose(100)
    assert (d.order, d.reason) == ((1, 2, 0), "degraded")


def test_retries_walk_the_order_within_the_bound() -> None:
    r = abc(max_attempts=2, failures_to_trip=100)
    attempts = 0
    d = r.choose(0)
    for i in d.order:  # every attempt fails
        attempts += 1
        r.on_start(i, 0)
        r.on_failure(i, 0)
    assert attempts == 2
    assert sum(r.state(i)["failures"] for i in range(3)) == 2


def test_affinity_sticks_and_moves() -> None:
    r = Router([DeploymentSpec(name=n) for n in "abc"], policy="swrr")
    home = r.choose(0, affinity="conversation-1").first
    for t in range(1, 100):
        d = r.choose(t, affinity="conversation-1")
        assert (d.first, d.reason) == (home, "affinity")
        r.choose(t)  # other traffic keeps rotating
    assert r.affinity_target("conversation-1") == home
    fail(r, home, 100)
    d = r.choose(101, affinity="conversation-1")
    assert d.reason == "fallback" and d.first != home
    assert r.choose(102, affinity="conversation-1").first == d.first
    # Int keys work the same, negative ones too (Python's hash()).
    k = hash("conversation-2")
    first = r.choose(103, affinity=k).first
    assert r.choose(104, affinity=k) == r.choose(105, affinity=k)
    assert r.affinity_target(k) == first


def test_decision_object() -> None:
    d = abc().choose(0)
    assert isinstance(d, Decision)
    assert d.order == (0, 1, 2) and d.first == 0 and d.reason == "policy"
    assert repr(d) == "Decision(order=(0, 1, 2), reason='policy')"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "fastest"}, "unknown routing policy"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts must be >= 0"),
        ({"cooldown_ms": 10, "max_cooldown_ms": 5}, "cooldown_ms"),
        ({"affinity_slots": 1000}, "power of two"),
    ],
)
def test_validation_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Router([DeploymentSpec(name="a")], **kwargs)  # type: ignore[arg-type]


def test_validation_deployments() -> None:
    with pytest.raises(ValueError, match="at least one deployment"):
        Router([])
    with pytest.raises(ValueError, match="weight 0"):
        Router([DeploymentSpec(name="a", weight=0)], policy="random")
    Router([DeploymentSpec(name="a", weight=0)], policy="p2c")  # p2c ignores weights
    with pytest.raises(ValueError, match=r'"a": output_per_1m must be >= 0, got -5'):
        Router([DeploymentSpec(name="a", output_per_1m=-5)])
    with pytest.raises(ValueError, match="rpm, tpm and max_concurrency must be positive"):
        Router([DeploymentSpec(name="a", rpm=0)])
    r = abc()
    with pytest.raises(IndexError):
        r.on_start(3, 0)
    with pytest.raises(ValueError, match="latency_ms"):
        r.on_success(0, 0, latency_ms=-1.0)


SMALL_TALK = "hi! how are you doing today?"
CODE = """Here is my code:
```python
def merge(a, b):
    out = {}
    for k in a: out[k] = a[k];
    return out
```
Why does it drop keys from b?"""
MATH = r"Solve for x: 3x + 5 = 20, then prove that \frac{x^2}{5} = 5 and 2 * 3 = 6."


def test_tier_scores_rank_prompts() -> None:
    s = TierScorer(keywords=("prove", "refactor"))
    chat = s.score_text(SMALL_TALK, prompt_tokens=8)
    code = s.score_text(CODE, depth=1, prompt_tokens=60)
    math = s.score_text(MATH, prompt_tokens=40)
    report = "The quarter closed with revenue up, costs down, and two new markets opened. " * 30
    long = s.score_text(report, prompt_tokens=500)
    assert chat < 0.2 and s.tier(chat) == "cheap"
    assert s.tier(code) == "strong" and s.tier(long) == "strong"
    assert chat < math and chat < long < 1.0
    # The caller's token count alone no longer moves the score (its fitted weight is 0); a deep
    # conversation does.
    assert s.score_text("Summarise this report.", prompt_tokens=7_000) < s.threshold
    assert s.score_text("Summarise this report.", depth=6) > s.score_text("Summarise this report.")
    f = s.features("Two words,\tthen three, four  five", prompt_tokens=3)
    assert (f.words, f.commas) == (6, 2)
    f = s.features(MATH, prompt_tokens=40)
    assert f.keyword_hits == 1 and f.math_markers >= 4
    assert s.score(f) == s.score_text(MATH, prompt_tokens=40)
    assert s.features(CODE).code_markers >= 3 and s.features(CODE).symbols >= 3
    assert s.features("REFACTOR please").keyword_hits == 1  # case-insensitive
    assert s.features("x", depth=2, tools=True, prompt_tokens=9).tools is True


def test_tier_threshold_and_weights() -> None:
    assert TierScorer().threshold == _core.TierScorer().threshold == 0.48
    assert set(TierScorer().weights) == {
        "prompt_tokens", "words", "commas", "depth", "tools", "code", "math", "keywords"
    }  # fmt: skip
    s = TierScorer(threshold=0.3)
    assert s.tier(0.29) == "cheap"
    assert s.tier(0.3) == "strong"
    tools_only = TierScorer(weights={name: 0.0 for name in TierScorer().weights} | {"tools": 1})
    assert tools_only.score_text(CODE, tools=False) == 0.0
    assert tools_only.score_text("hi", tools=True) == 1.0
    with pytest.raises(ValueError, match="unknown tier weight"):
        TierScorer(weights={"speed": 1.0})
    with pytest.raises(ValueError, match="threshold"):
        TierScorer(threshold=1.5)


def test_tier_contract_forbids_strong() -> None:
    s = TierScorer()
    no = Contract(allow_strong=False)
    assert {s.tier(1.0, no, holder="t") for _ in range(100)} == {"cheap"}
    assert s.tier(1.0, Contract(), holder="t") == "strong"


def test_tier_contract_caps_share_per_holder() -> None:
    s = TierScorer()
    capped = Contract(max_strong_share=0.3)
    strong = 0
    for n in range(1, 10_001):
        strong += s.tier(0.9, capped, holder="tenant-a") == "strong"
        assert strong <= 0.3 * n
    assert strong == 3_000
    assert s.share("tenant-a") == (3_000, 10_000)
    # Another holder has its own share; cheap-scoring requests never become strong.
    assert s.tier(0.9, capped, holder="tenant-b") == "cheap"  # 1/1 would exceed 0.3
    assert s.share("tenant-b") == (0, 1)
    assert {s.tier(0.1, capped, holder="tenant-c") for _ in range(100)} == {"cheap"}
    with pytest.raises(ValueError, match="max_strong_share"):
        s.tier(0.9, Contract(max_strong_share=2.0), holder="x")
