use super::*;

fn spec(name: &str, weight: u32) -> DeploymentSpec {
    DeploymentSpec {
        name: name.into(),
        weight,
        ..DeploymentSpec::default()
    }
}

fn router(specs: Vec<DeploymentSpec>, policy: Policy) -> Router {
    Router::new(
        specs,
        Config {
            policy,
            ..Config::default()
        },
    )
    .unwrap()
}

fn abc(policy: Policy) -> Router {
    router(vec![spec("a", 5), spec("b", 1), spec("c", 1)], policy)
}

/// Runs one request to completion on the first choice.
fn serve(r: &mut Router, now: u64) -> usize {
    let d = r.choose(now, 100, None);
    let i = d.first();
    r.on_start(i, now, 100).unwrap();
    r.on_success(i, now, 10.0, 0.0).unwrap();
    i
}

#[test]
fn swrr_exact_sequence() {
    let mut r = abc(Policy::Swrr);
    let seq: String = (0..14)
        .map(|_| ["a", "b", "c"][r.choose(0, 0, None).first()])
        .collect();
    assert_eq!(seq, "aabacaaaabacaa");
}

#[test]
fn swrr_adherence_is_exact() {
    let mut r = abc(Policy::Swrr);
    let mut counts = [0u64; 3];
    for _ in 0..100_000 {
        counts[r.choose(0, 0, None).first()] += 1;
    }
    for (c, w) in counts.iter().zip([5.0, 1.0, 1.0]) {
        assert!((*c as f64 - 100_000.0 * w / 7.0).abs() <= 1.0, "{counts:?}");
    }
}

#[test]
fn random_adherence_within_one_percent() {
    let mut r = abc(Policy::Random);
    let mut counts = [0u64; 3];
    for _ in 0..100_000 {
        counts[r.choose(0, 0, None).first()] += 1;
    }
    for (c, w) in counts.iter().zip([5.0, 1.0, 1.0]) {
        assert!((*c as f64 / 100_000.0 - w / 7.0).abs() < 0.01, "{counts:?}");
    }
}

#[test]
fn determinism_by_seed() {
    let run = |seed| {
        let mut r = Router::new(
            vec![spec("a", 1), spec("b", 1), spec("c", 1)],
            Config {
                policy: Policy::Random,
                seed,
                ..Config::default()
            },
        )
        .unwrap();
        (0..64)
            .map(|_| r.choose(0, 0, None).order().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn attempts_bounded_and_distinct() {
    for policy in Policy::ALL {
        for max_attempts in 1..=5 {
            let specs = (0..4).map(|i| spec(&format!("d{i}"), 1 + i)).collect();
            let mut r = Router::new(
                specs,
                Config {
                    policy,
                    max_attempts,
                    ..Config::default()
                },
            )
            .unwrap();
            for t in 0..50 {
                let d = r.choose(t, 10, None);
                let o = d.order();
                assert_eq!(o.len(), max_attempts.min(4), "{policy:?}");
                let mut s = o.to_vec();
                s.sort_unstable();
                s.dedup();
                assert_eq!(s.len(), o.len(), "{policy:?} repeats: {o:?}");
            }
        }
    }
}

#[test]
fn p2c_prefers_fewer_outstanding() {
    let mut r = router(vec![spec("a", 1), spec("b", 1)], Policy::P2c);
    for _ in 0..5 {
        r.on_start(0, 0, 0).unwrap();
    }
    for _ in 0..100 {
        let d = r.choose(0, 0, None);
        assert_eq!(d.order(), &[1, 0]);
    }
}

#[test]
fn latency_moves_to_faster() {
    let mut r = router(vec![spec("slow", 1), spec("fast", 1)], Policy::Latency);
    let mut fast = 0;
    for t in 0..1000 {
        let d = r.choose(t, 0, None);
        let i = d.first();
        r.on_start(i, t, 0).unwrap();
        r.on_success(i, t, if i == 0 { 800.0 } else { 100.0 }, 0.0)
            .unwrap();
        fast += usize::from(i == 1);
    }
    assert!(fast > 950, "fast got {fast}");
    // Exploration still measures the slow one now and then.
    assert!(r.state(0, None).unwrap().started > 1);
}

#[test]
fn cheapest_moves_when_rpm_used_up() {
    let mut cheap = spec("cheap", 1);
    cheap.input_per_1m = 100;
    cheap.output_per_1m = 400;
    cheap.rpm = Some(10);
    let mut dear = spec("dear", 1);
    dear.input_per_1m = 1_000;
    dear.output_per_1m = 4_000;
    let mut r = router(vec![dear, cheap], Policy::Cheapest);
    for _ in 0..10 {
        let d = r.choose(0, 0, None);
        assert_eq!((d.first(), d.reason), (1, Reason::Policy));
        r.on_start(1, 0, 0).unwrap();
    }
    let d = r.choose(0, 0, None);
    assert_eq!((d.order(), d.reason), (&[0u16][..], Reason::Fallback));
    // One request's worth of the bucket drains in 6 s.
    assert_eq!(r.choose(5_999, 0, None).first(), 0);
    assert_eq!(r.choose(6_000, 0, None).first(), 1);
}

#[test]
fn tpm_and_concurrency_capacity() {
    let mut a = spec("a", 1);
    a.tpm = Some(1_000);
    a.max_concurrency = Some(2);
    let mut b = spec("b", 1);
    b.priority = 1;
    let mut r = router(vec![a, b], Policy::Priority);
    r.on_start(0, 0, 600).unwrap();
    assert_eq!(r.choose(0, 400, None).first(), 0);
    assert_eq!(r.choose(0, 401, None).first(), 1);
    r.on_start(0, 0, 1).unwrap();
    // Two outstanding: full whatever the tokens.
    assert_eq!(r.choose(0, 0, None).first(), 1);
    let s = r.state(0, Some(0)).unwrap();
    assert_eq!((s.outstanding, s.tpm_used), (2, 601));
}

#[test]
fn priority_falls_back_then_returns() {
    let mut p0 = spec("primary", 1);
    p0.priority = 0;
    let mut p1 = spec("backup", 1);
    p1.priority = 1;
    let mut r = router(vec![p1, p0], Policy::Priority);
    let d = r.choose(0, 0, None);
    assert_eq!((d.order(), d.reason), (&[1u16, 0][..], Reason::Policy));
    for _ in 0..3 {
        r.on_start(1, 0, 0).unwrap();
        r.on_failure(1, 0).unwrap();
    }
    let d = r.choose(1, 0, None);
    assert_eq!((d.order(), d.reason), (&[0u16][..], Reason::Fallback));
    // After the cooldown the primary gets the probe; success brings it back.
    let d = r.choose(5_000, 0, None);
    assert_eq!((d.order(), d.reason), (&[1u16, 0][..], Reason::Probe));
    r.on_start(1, 5_000, 0).unwrap();
    r.on_success(1, 5_001, 50.0, 0.0).unwrap();
    assert_eq!(r.choose(5_002, 0, None).reason, Reason::Policy);
}

#[test]
fn circuit_cooldown_probe_and_doubling() {
    let mut r = abc(Policy::Swrr);
    for t in 0..3 {
        assert_eq!(r.state(1, Some(t)).unwrap().circuit, Circuit::Closed);
        r.on_start(1, t, 0).unwrap();
        r.on_failure(1, t).unwrap();
    }
    let s = r.state(1, Some(2)).unwrap();
    assert_eq!((s.circuit, s.cooldown_until), (Circuit::Open, Some(5_002)));
    for t in (2..5_002).step_by(7) {
        let d = r.choose(t, 0, None);
        assert!(!d.order().contains(&1), "open deployment listed at {t}");
    }
    assert_eq!(r.state(1, Some(5_002)).unwrap().circuit, Circuit::HalfOpen);
    let d = r.choose(5_002, 0, None);
    assert_eq!((d.first(), d.reason), (1, Reason::Probe));
    // One probe at a time.
    for _ in 0..20 {
        assert!(!r.choose(5_003, 0, None).order().contains(&1));
    }
    r.on_start(1, 5_002, 0).unwrap();
    r.on_failure(1, 5_100).unwrap();
    let s = r.state(1, Some(5_100)).unwrap();
    assert_eq!((s.cooldown_ms, s.cooldown_until), (10_000, Some(15_100)));
    // Probe again, fail again: 20 s, then capped at 60 s.
    let mut t = 15_100;
    for want in [20_000, 40_000, 60_000, 60_000] {
        assert_eq!(r.choose(t, 0, None).reason, Reason::Probe);
        r.on_failure(1, t).unwrap();
        assert_eq!(r.state(1, Some(t)).unwrap().cooldown_ms, want);
        t += want;
    }
    assert_eq!(r.choose(t, 0, None).reason, Reason::Probe);
    r.on_success(1, t, 10.0, 0.0).unwrap();
    let s = r.state(1, Some(t)).unwrap();
    assert_eq!((s.circuit, s.cooldown_ms), (Circuit::Closed, 5_000));
}

#[test]
fn success_resets_consecutive_failures() {
    let mut r = abc(Policy::Swrr);
    for t in 0..10 {
        r.on_failure(0, t).unwrap();
        r.on_failure(0, t).unwrap();
        r.on_success(0, t, 1.0, 0.0).unwrap();
    }
    assert_eq!(r.state(0, Some(10)).unwrap().circuit, Circuit::Closed);
}

#[test]
fn everything_open_is_degraded_not_refused() {
    let mut r = abc(Policy::Swrr);
    for (i, t) in [(0, 30), (1, 10), (2, 20)] {
        for _ in 0..3 {
            r.on_failure(i, t).unwrap();
        }
    }
    let d = r.choose(100, 0, None);
    assert_eq!((d.order(), d.reason), (&[1u16, 2, 0][..], Reason::Degraded));
}

#[test]
fn affinity_sticks_while_healthy_and_moves_when_not() {
    let mut r = router(vec![spec("a", 1), spec("b", 1), spec("c", 1)], Policy::Swrr);
    let first = r.choose(0, 0, Some(42));
    assert_eq!(first.reason, Reason::Policy);
    let home = first.first();
    for t in 1..200 {
        let d = r.choose(t, 0, Some(42));
        assert_eq!((d.first(), d.reason), (home, Reason::Affinity));
        // Other traffic keeps rotating.
        serve(&mut r, t);
    }
    for _ in 0..3 {
        r.on_failure(home, 200).unwrap();
    }
    let d = r.choose(201, 0, Some(42));
    assert_eq!(d.reason, Reason::Fallback);
    let new_home = d.first();
    assert_ne!(new_home, home);
    assert_eq!(r.affinity_target(42), Some(new_home));
    let d = r.choose(202, 0, Some(42));
    assert_eq!((d.first(), d.reason), (new_home, Reason::Affinity));
}

#[test]
fn affinity_table_is_bounded_and_overwrites() {
    let mut r = Router::new(
        vec![spec("a", 1), spec("b", 1)],
        Config {
            affinity_slots: 4,
            ..Config::default()
        },
    )
    .unwrap();
    for k in 0..100u64 {
        r.choose(0, 0, Some(k));
    }
    let kept = (0..100u64)
        .filter(|&k| r.affinity_target(k).is_some())
        .count();
    assert!((1..=4).contains(&kept), "{kept}");
}

#[test]
fn validation() {
    let cfg = Config::default();
    assert_eq!(
        Router::new(vec![], cfg).unwrap_err(),
        RouterError::NoDeployments
    );
    assert!(matches!(
        Router::new(vec![spec("a", 0)], cfg).unwrap_err(),
        RouterError::ZeroTotalWeight { policy: "swrr" }
    ));
    let p2c = Config {
        policy: Policy::P2c,
        ..cfg
    };
    assert!(Router::new(vec![spec("a", 0)], p2c).is_ok());
    assert!(matches!(
        Policy::parse("fastest"),
        Err(RouterError::UnknownPolicy(_))
    ));
    let mut s = spec("a", 1);
    s.rpm = Some(0);
    assert!(matches!(
        Router::new(vec![s], cfg),
        Err(RouterError::Invalid(_))
    ));
    assert!(non_negative("weight", -1).is_err());
    let mut r = abc(Policy::Swrr);
    assert_eq!(
        r.on_start(3, 0, 0).unwrap_err(),
        RouterError::BadIndex { index: 3, len: 3 }
    );
    assert!(r.on_success(0, 0, f64::NAN, 0.0).is_err());
}

#[test]
fn zero_weight_is_standby() {
    let mut r = router(vec![spec("main", 1), spec("standby", 0)], Policy::Swrr);
    for t in 0..10 {
        assert_eq!(r.choose(t, 0, None).order(), &[0, 1]);
    }
    for _ in 0..3 {
        r.on_failure(0, 10).unwrap();
    }
    let d = r.choose(11, 0, None);
    assert_eq!((d.first(), d.reason), (1, Reason::Fallback));
}

fn scorer() -> TierScorer {
    TierScorer::new(
        tier::DEFAULT_THRESHOLD,
        Weights::default(),
        vec!["refactor".into(), "prove".into()],
    )
    .unwrap()
}

#[test]
fn tier_features_and_scores() {
    let s = scorer();
    let f = s.features(
        "```python\ndef f(x):\n    return x * 2\n```\nPlease REFACTOR this.",
        2,
        false,
        40,
    );
    assert_eq!(f.keyword_hits, 1);
    assert!(f.code_markers >= 3, "{f:?}");
    let m = s.features("Solve 3 + 4 = 7 and 12/4 = 3; \\frac{1}{2}", 0, false, 20);
    assert!(m.math_markers >= 5, "{m:?}");
    let w = s.features("  two\twords,\n\nthree, four,five 1,000 ", 0, false, 0);
    assert_eq!((w.words, w.commas), (5, 4), "{w:?}");
    assert_eq!(s.features("", 0, false, 0).words, 0);
    let chat = s.score_text("hi! how are you today?", 0, false, 7);
    let code = s.score(&f);
    let math = s.score(&m);
    // Length counts by the words of the text (the caller's token count has no default weight).
    let story = "Tell me a story about a lighthouse keeper, her dog, and the storm. ".repeat(40);
    let long = s.score_text(&story, 0, false, 700);
    assert!(s.score_text("tell me a story", 0, false, 6_000) < s.threshold());
    assert!(chat < 0.2, "{chat}");
    for (what, v) in [("code", code), ("math", math), ("long", long)] {
        assert!(v > chat, "{what} {v} <= chat {chat}");
        assert!((0.0..=1.0).contains(&v));
    }
    assert!(
        code >= s.threshold() && long >= s.threshold(),
        "{code} {long}"
    );
    assert!(s.score_text("x", 20, true, 100_000) <= 1.0);
}

#[test]
fn tier_contract() {
    let mut s = scorer();
    let open = Contract::default();
    assert_eq!(s.tier(0.47, open, 1).unwrap(), Tier::Cheap);
    assert_eq!(s.tier(0.48, open, 1).unwrap(), Tier::Strong);
    let no = Contract {
        allow_strong: false,
        max_strong_share: None,
    };
    assert_eq!(s.tier(1.0, no, 1).unwrap(), Tier::Cheap);
    let capped = Contract {
        allow_strong: true,
        max_strong_share: Some(0.3),
    };
    let mut strong = 0;
    for i in 0..10_000 {
        if s.tier(1.0, capped, 2).unwrap() == Tier::Strong {
            strong += 1;
        }
        assert!(strong as f64 <= 0.3 * (i + 1) as f64);
    }
    assert_eq!(strong, 3_000);
    assert_eq!(s.share(2), (3_000, 10_000));
    assert!(s
        .tier(
            1.0,
            Contract {
                allow_strong: true,
                max_strong_share: Some(1.5)
            },
            3
        )
        .is_err());
    assert!(TierScorer::new(1.5, Weights::default(), vec![]).is_err());
    assert!(Weights::default().set("speed", 1.0).is_err());
}
