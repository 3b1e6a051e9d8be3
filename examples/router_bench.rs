//! Nanoseconds per routing decision, in plain Rust (no Python).
//!
//!     cargo run --release --example router_bench [-- --secs 0.5 --json]
//!
//! For each policy with 3 and 16 deployments (weights 1..=n, distinct prices and priorities,
//! no capacity limits), two loops on a virtual clock advancing 1 ms per request:
//! - `choose`: the decision alone;
//! - `cycle`: choose, then on_start and on_success on the first choice (what one request costs
//!   the router), with latencies that differ per deployment so `latency` has work to do.
//!
//! Plus `TierScorer::score_text` on a ~2 KB mixed prose/code prompt. `--json` prints one JSON
//! object as the last line, for benches/bench_router.py.

use _core::router::{Config, DeploymentSpec, Policy, Router, TierScorer, Weights};
use std::hint::black_box;
use std::time::Instant;

fn specs(n: usize) -> Vec<DeploymentSpec> {
    (0..n)
        .map(|i| DeploymentSpec {
            name: format!("d{i}"),
            weight: 1 + i as u32,
            priority: (i % 3) as u32,
            input_per_1m: 100_000_000 + 7_000_000 * i as u64,
            cached_input_per_1m: 50_000_000,
            output_per_1m: 400_000_000 + 11_000_000 * i as u64,
            ..DeploymentSpec::default()
        })
        .collect()
}

/// ns per iteration of `f`, over at least `secs` seconds (batches of 4096).
fn time(secs: f64, mut f: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..4096 {
            f(n);
            n += 1;
        }
        let el = start.elapsed().as_secs_f64();
        if el >= secs {
            return el * 1e9 / n as f64;
        }
    }
}

/// The same ~2 KB prompt benches/bench_router.py builds.
pub fn prompt_2kb() -> String {
    let prose = "Please review the following change and explain what it does, whether the \
                 error handling is right, and how we could make it faster without changing \
                 its behaviour. ";
    let code = "```python\ndef merge(a, b):\n    out = {}\n    for k in a:\n        out[k] = a[k];\n    return out\n```\n";
    let mut s = String::new();
    while s.len() < 2048 {
        s.push_str(prose);
        s.push_str(code);
    }
    s.truncate(2048);
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    let json = args.iter().any(|a| a == "--json");
    let mut results = Vec::new();
    println!("| policy | deployments | choose ns | cycle ns |");
    println!("|---|---:|---:|---:|");
    for policy in Policy::ALL {
        for n in [3usize, 16] {
            let config = Config {
                policy,
                seed: 1,
                ..Config::default()
            };
            let mut r = Router::new(specs(n), config).expect("router");
            let choose = time(secs, |t| {
                black_box(r.choose(black_box(t), 1_000, None));
            });
            let mut r = Router::new(specs(n), config).expect("router");
            let cycle = time(secs, |t| {
                let d = r.choose(t, 1_000, None);
                let i = d.first();
                r.on_start(i, t, 1_000).expect("start");
                r.on_success(i, t, 100.0 + 10.0 * i as f64, 20.0)
                    .expect("success");
            });
            println!("| {} | {n} | {choose:.0} | {cycle:.0} |", policy.name());
            results.push(format!(
                "{{\"policy\":\"{}\",\"deployments\":{n},\"choose_ns\":{choose:.1},\"cycle_ns\":{cycle:.1}}}",
                policy.name()
            ));
        }
    }
    let scorer = TierScorer::new(
        0.5,
        Weights::default(),
        vec!["prove".into(), "refactor".into()],
    )
    .expect("scorer");
    let text = prompt_2kb();
    let score_ns = time(secs, |_| {
        black_box(scorer.score_text(black_box(&text), 3, false, 500));
    });
    println!(
        "\nTierScorer::score_text on {} bytes: {score_ns:.0} ns",
        text.len()
    );
    if json {
        println!(
            "{{\"decisions\":[{}],\"score_text_ns\":{score_ns:.1},\"prompt_bytes\":{}}}",
            results.join(","),
            text.len()
        );
    }
}
