//! Reserve+settle pairs per second on the shared quota table, in plain Rust (no Python).
//!
//!     cargo run --release --example quota_bench [-- --secs 1 --json]
//!
//! Every limit of the accounts is set (budgets high enough never to refuse), so each pair runs
//! every CAS: concurrency, rpm, tpm, tokens, money, requests, the slot claim and publish, and
//! at settle the slot CAS and the counter updates. Each pair reads CLOCK_MONOTONIC once.
//! `--json` prints one JSON object (pairs per second per scenario) as the last line, for
//! benches/bench_quota.py.

use _core::quota::{clock_ns, Actual, Amounts, Limit, QuotaTable};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AMOUNTS: Amounts = Amounts {
    tokens: 1_000,
    money: 5_000,
    requests: 1,
    concurrent: true,
};
const ACTUAL: Actual = Actual {
    tokens: 700,
    money: 3_500,
    requests: None,
};

fn setup(t: &QuotaTable, names: &[&str]) -> Vec<u32> {
    names
        .iter()
        .map(|n| {
            let k = t.account(n).expect("account");
            for (l, v) in [
                (Limit::Tokens, 1 << 60),
                (Limit::Money, 1 << 60),
                (Limit::Requests, 1 << 60),
                (Limit::Concurrent, 1 << 20),
                (Limit::Rpm, 1 << 40),
                (Limit::Tpm, 1 << 50),
            ] {
                t.set_limit(k, l, v).expect("limit");
            }
            k
        })
        .collect()
}

/// Pairs done in `secs` seconds on `accounts`.
fn run(t: &QuotaTable, accounts: &[u32], secs: f64) -> (u64, f64) {
    let start = Instant::now();
    let until = Duration::from_secs_f64(secs);
    let mut pairs = 0u64;
    loop {
        for _ in 0..1024 {
            let now = clock_ns();
            let id = t
                .reserve(accounts, AMOUNTS, 60_000, now)
                .expect("reserve")
                .expect("admitted");
            t.settle(id, ACTUAL, now).expect("settle");
        }
        pairs += 1024;
        let el = start.elapsed();
        if el >= until {
            return (pairs, el.as_secs_f64());
        }
    }
}

fn threads(t: &Arc<QuotaTable>, per_thread: Vec<Vec<u32>>, secs: f64) -> f64 {
    let hs: Vec<_> = per_thread
        .into_iter()
        .map(|acc| {
            let t = Arc::clone(t);
            std::thread::spawn(move || run(&t, &acc, secs))
        })
        .collect();
    hs.into_iter()
        .map(|h| {
            let (n, el) = h.join().expect("thread");
            n as f64 / el
        })
        .sum()
}

fn processes(path: &Path, n: usize, secs: f64) -> f64 {
    let exe = std::env::current_exe().expect("current_exe");
    let children: Vec<_> = (0..n)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--child", &path.display().to_string(), &secs.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("child");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .expect("child rate")
        })
        .sum()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let t = QuotaTable::attach(Path::new(&args[2])).expect("attach");
        let secs: f64 = args[3].parse().expect("secs");
        let k = t.find_account("key").expect("find").expect("key");
        let (n, el) = run(&t, &[k], secs);
        println!("{}", n as f64 / el);
        return;
    }
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .map_or(1.0, |s| s.parse().expect("--secs N"));
    let json = args.iter().any(|a| a == "--json");

    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("tokenhub-quota-bench-{}", std::process::id()));
    let t = Arc::new(QuotaTable::create(&path, 64, 16_384).expect("create"));
    let key = setup(&t, &["key"])[0];
    let tenant = setup(&t, &["tenant"])[0];
    let others = setup(&t, &["key-2", "tenant-2"]);

    // Warm-up, then the scenarios.
    run(&t, &[key], 0.2);
    let mut results: Vec<(&str, f64)> = Vec::new();
    let (n, el) = run(&t, &[key], secs);
    results.push(("1 thread, 1 account", n as f64 / el));
    let (n, el) = run(&t, &[key, tenant], secs);
    results.push(("1 thread, key + tenant", n as f64 / el));
    results.push((
        "2 threads, same account",
        threads(&t, vec![vec![key], vec![key]], secs),
    ));
    results.push((
        "2 threads, key + tenant, same pair",
        threads(&t, vec![vec![key, tenant], vec![key, tenant]], secs),
    ));
    results.push((
        "2 threads, separate accounts",
        threads(&t, vec![vec![key], vec![others[0]]], secs),
    ));
    results.push(("2 processes, same account", processes(&path, 2, secs)));

    // Latency of one reserve (and one settle), from many samples.
    let mut res_ns = Vec::with_capacity(100_000);
    let mut set_ns = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let a = Instant::now();
        let now = clock_ns();
        let id = t
            .reserve(&[key, tenant], AMOUNTS, 60_000, now)
            .expect("r")
            .expect("ok");
        let b = Instant::now();
        t.settle(id, ACTUAL, now).expect("settle");
        let c = Instant::now();
        res_ns.push((b - a).as_nanos() as u64);
        set_ns.push((c - b).as_nanos() as u64);
    }
    res_ns.sort_unstable();
    set_ns.sort_unstable();
    let pct = |v: &[u64], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];

    let stats = t.stats();
    drop(t);
    let _ = std::fs::remove_file(&path);
    assert_eq!(stats.held, 0, "every reservation settled");
    assert_eq!(stats.reserved, stats.settled);

    for (name, rate) in &results {
        println!(
            "{name:<36} {:>12.0} pairs/s  ({:.0} ns/pair)",
            rate,
            1e9 / rate
        );
    }
    println!(
        "reserve (key + tenant) p50 {} ns, p99 {} ns, p99.9 {} ns; settle p50 {} ns, p99 {} ns",
        pct(&res_ns, 0.5),
        pct(&res_ns, 0.99),
        pct(&res_ns, 0.999),
        pct(&set_ns, 0.5),
        pct(&set_ns, 0.99)
    );
    if json {
        let fields: Vec<String> = results
            .iter()
            .map(|(n, r)| format!("\"{n}\": {r:.0}"))
            .collect();
        println!(
            "{{\"pairs_per_s\": {{{}}}, \"reserve_ns\": {{\"p50\": {}, \"p99\": {}, \"p999\": {}}}, \"settle_ns\": {{\"p50\": {}, \"p99\": {}}}, \"reservations\": {}}}",
            fields.join(", "),
            pct(&res_ns, 0.5),
            pct(&res_ns, 0.99),
            pct(&res_ns, 0.999),
            pct(&set_ns, 0.5),
            pct(&set_ns, 0.99),
            stats.reserved
        );
    }
}
