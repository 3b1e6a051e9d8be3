use super::*;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

const S: u64 = 1_000_000_000;
/// A fake clock far from 0, so "before now" is representable.
const T0: u64 = 1_000 * S;

fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "tokenhub-quota-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    ))
}

fn one(tokens: u64) -> Amounts {
    Amounts {
        tokens,
        money: 0,
        requests: 1,
        concurrent: true,
    }
}

fn actual(tokens: u64) -> Actual {
    Actual {
        tokens,
        ..Actual::default()
    }
}

fn table() -> QuotaTable {
    QuotaTable::anonymous(64, 256).unwrap()
}

#[test]
fn create_attach_and_share_one_table() {
    let path = temp_path("share");
    let a = QuotaTable::create(&path, 16, 32).unwrap();
    let b = QuotaTable::attach(&path).unwrap();
    assert_eq!((b.account_capacity(), b.reservation_capacity()), (16, 32));
    let k = a.account("key-1").unwrap();
    assert_eq!(b.find_account("key-1").unwrap(), Some(k));
    b.set_limit(k, Limit::Tokens, 100).unwrap();
    let id = a.reserve(&[k], one(60), 1000, T0).unwrap().unwrap();
    // The second mapping sees the hold and refuses what would exceed the limit.
    let r = b.reserve(&[k], one(60), 1000, T0).unwrap().unwrap_err();
    assert_eq!((r.limit, r.remaining, r.account), (Limit::Tokens, 40, k));
    b.settle(id, actual(10), T0).unwrap();
    assert_eq!(a.snapshot(k, T0).unwrap().tokens.used, 10);
    drop((a, b));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn attach_refuses_what_is_not_a_table() {
    let path = temp_path("bad");
    std::fs::write(&path, vec![7u8; 4096]).unwrap();
    let e = QuotaTable::attach(&path).err().unwrap();
    assert!(e.to_string().contains("bad magic"), "{e}");
    std::fs::write(&path, b"short").unwrap();
    let e = QuotaTable::attach(&path).err().unwrap();
    assert!(e.to_string().contains("shorter than"), "{e}");
    // A real table, truncated.
    QuotaTable::create(&path, 4, 4).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(shm::table_size(4, 4) as u64 - 64).unwrap();
    let e = QuotaTable::attach(&path).err().unwrap();
    assert!(
        matches!(e, QuotaError::BadTable { .. }) && e.to_string().contains("need"),
        "{e}"
    );
    // Another layout version.
    QuotaTable::create(&path, 4, 4).unwrap();
    {
        let t = QuotaTable::attach(&path).unwrap();
        t.map.header().version.store(99, Relaxed);
    }
    let e = QuotaTable::attach(&path).err().unwrap();
    assert!(e.to_string().contains("version 99"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = QuotaTable::attach(&path).err().unwrap();
    assert!(matches!(e, QuotaError::Io { .. }), "{e}");
    assert!(QuotaTable::anonymous(0, 4).is_err());
}

#[test]
fn accounts_by_name_and_capacity() {
    let t = QuotaTable::anonymous(4, 4).unwrap();
    let names = ["a", "tenant:acme", &"x".repeat(NAME_MAX), "ключ"];
    let idx: Vec<u32> = names.iter().map(|n| t.account(n).unwrap()).collect();
    for (n, &i) in names.iter().zip(&idx) {
        assert_eq!(t.account(n).unwrap(), i);
        assert_eq!(t.account_name(i).unwrap(), *n);
        assert_eq!(t.get_limit(i, Limit::Tokens).unwrap(), UNLIMITED);
    }
    let mut sorted = idx.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 4);
    assert_eq!(t.find_account("nope").unwrap(), None);
    assert!(matches!(
        t.account("one-too-many"),
        Err(QuotaError::AccountsFull { capacity: 4 })
    ));
    assert!(matches!(t.account(""), Err(QuotaError::Invalid(_))));
    assert!(matches!(
        t.account(&"y".repeat(NAME_MAX + 1)),
        Err(QuotaError::Invalid(_))
    ));
    assert_eq!(t.stats().accounts, 4);
    assert!(t.set_limit(99, Limit::Rpm, 1).is_err());
}

#[test]
fn settle_moves_held_to_used_and_records_overruns() {
    let t = table();
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Tokens, 1000).unwrap();
    t.set_limit(k, Limit::Money, 5_000).unwrap();
    let a = Amounts {
        tokens: 400,
        money: 2_000,
        requests: 1,
        concurrent: true,
    };
    let id = t.reserve(&[k], a, 1000, T0).unwrap().unwrap();
    let snap = t.snapshot(k, T0).unwrap();
    assert_eq!(
        (snap.tokens.held, snap.money.held, snap.inflight),
        (400, 2_000, 1)
    );
    let s = t
        .settle(
            id,
            Actual {
                tokens: 150,
                money: 2_500,
                requests: None,
            },
            T0,
        )
        .unwrap();
    assert_eq!(
        s,
        Settlement {
            overrun_tokens: 0,
            overrun_money: 500,
            late: false
        }
    );
    let snap = t.snapshot(k, T0).unwrap();
    assert_eq!(
        snap.tokens,
        BudgetSnapshot {
            limit: 1000,
            used: 150,
            held: 0,
            overrun: 0
        }
    );
    assert_eq!(
        snap.money,
        BudgetSnapshot {
            limit: 5_000,
            used: 2_500,
            held: 0,
            overrun: 500
        }
    );
    assert_eq!((snap.requests.used, snap.inflight), (1, 0));
    // Ended reservations cannot be settled, cancelled or extended again.
    assert!(matches!(
        t.settle(id, actual(1), T0),
        Err(QuotaError::Finished {
            state: "settled",
            ..
        })
    ));
    assert!(matches!(t.cancel(id), Err(QuotaError::Finished { .. })));
    assert!(t.extend(id, 1, 0, 10, T0).is_err());
    assert_eq!(t.reservation_state(id).unwrap(), "settled");
    // An overrun still counts against the budget afterwards.
    let id = t.reserve(&[k], one(850), 1000, T0).unwrap().unwrap();
    t.settle(id, actual(900), T0).unwrap();
    let snap = t.snapshot(k, T0).unwrap();
    assert_eq!((snap.tokens.used, snap.tokens.overrun), (1050, 50));
    assert!(snap.tokens.used <= snap.tokens.limit + snap.tokens.overrun);
    assert!(t.reserve(&[k], one(1), 1000, T0).unwrap().is_err());
    // A new period.
    assert_eq!(t.reset_used(k, Limit::Tokens).unwrap(), 1050);
    assert!(t.reserve(&[k], one(1000), 1000, T0).unwrap().is_ok());
    assert!(t.reset_used(k, Limit::Rpm).is_err());
}

#[test]
fn release_used_gives_back_at_most_what_is_used() {
    let t = table();
    let k = t.account("tenant:r").unwrap();
    t.set_limit(k, Limit::Money, 1000).unwrap();
    let id = t
        .reserve(
            &[k],
            Amounts {
                money: 600,
                ..Default::default()
            },
            1000,
            T0,
        )
        .unwrap()
        .unwrap();
    t.settle(
        id,
        Actual {
            money: 600,
            ..Default::default()
        },
        T0,
    )
    .unwrap();
    let held = t
        .reserve(
            &[k],
            Amounts {
                money: 300,
                ..Default::default()
            },
            1000,
            T0,
        )
        .unwrap()
        .unwrap();
    assert!(t
        .reserve(
            &[k],
            Amounts {
                money: 101,
                ..Default::default()
            },
            1000,
            T0
        )
        .unwrap()
        .is_err());
    assert_eq!(t.available(k, Limit::Money).unwrap(), 100);
    assert_eq!(t.available(k, Limit::Tokens).unwrap(), UNLIMITED);
    assert_eq!(t.release_used(k, Limit::Money, 250).unwrap(), 250);
    let snap = t.snapshot(k, T0).unwrap();
    assert_eq!((snap.money.used, snap.money.held), (350, 300));
    // Never more than is used, and holds are untouched.
    assert_eq!(t.release_used(k, Limit::Money, 10_000).unwrap(), 350);
    assert_eq!(t.snapshot(k, T0).unwrap().money.held, 300);
    assert!(t
        .reserve(
            &[k],
            Amounts {
                money: 700,
                ..Default::default()
            },
            1000,
            T0
        )
        .unwrap()
        .is_ok());
    t.cancel(held).unwrap();
    assert!(t.release_used(k, Limit::Rpm, 1).is_err());
}

#[test]
fn refusal_has_no_side_effects_and_rolls_back_earlier_accounts() {
    let t = table();
    let key = t.account("key").unwrap();
    let tenant = t.account("tenant").unwrap();
    t.set_limit(key, Limit::Tokens, 1000).unwrap();
    t.set_limit(key, Limit::Rpm, 100).unwrap();
    t.set_limit(key, Limit::Tpm, 100_000).unwrap();
    t.set_limit(tenant, Limit::Money, 10).unwrap();
    let before_key = t.snapshot(key, T0).unwrap();
    let a = Amounts {
        tokens: 500,
        money: 11,
        requests: 1,
        concurrent: true,
    };
    let r = t.reserve(&[key, tenant], a, 1000, T0).unwrap().unwrap_err();
    assert_eq!(
        (r.account, r.limit, r.limit_value, r.remaining),
        (tenant, Limit::Money, 10, 10)
    );
    assert_eq!(r.limit.code(), "insufficient_quota");
    let after_key = t.snapshot(key, T0).unwrap();
    assert_eq!(
        (
            after_key.tokens,
            after_key.inflight,
            after_key.rpm,
            after_key.tpm
        ),
        (
            before_key.tokens,
            before_key.inflight,
            before_key.rpm,
            before_key.tpm
        )
    );
    assert_eq!((after_key.refused, after_key.admitted), (0, 0));
    let tn = t.snapshot(tenant, T0).unwrap();
    assert_eq!((tn.money.held, tn.inflight, tn.refused), (0, 0, 1));
    assert_eq!(t.stats().reserved, 0);
    // Fits once the tenant is topped up.
    assert_eq!(t.add_budget(tenant, Limit::Money, 5).unwrap(), 15);
    let id = t.reserve(&[key, tenant], a, 1000, T0).unwrap().unwrap();
    assert_eq!(t.snapshot(tenant, T0).unwrap().money.held, 11);
    assert!(t.cancel(id).unwrap());
    let k = t.snapshot(key, T0).unwrap();
    assert_eq!(
        (
            k.tokens.held,
            k.tokens.used,
            k.inflight,
            k.rpm.remaining,
            k.tpm.remaining
        ),
        (0, 0, 0, 100, 100_000)
    );
    assert_eq!(t.add_budget(key, Limit::Requests, 5).unwrap(), UNLIMITED);
    assert!(t.reserve(&[key, key], a, 1, T0).is_err());
    assert!(t.reserve(&[], a, 1, T0).is_err());
}

#[test]
fn concurrency_limit() {
    let t = table();
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Concurrent, 2).unwrap();
    let a = t.reserve(&[k], one(1), 1000, T0).unwrap().unwrap();
    let _b = t.reserve(&[k], one(1), 1000, T0).unwrap().unwrap();
    let r = t.reserve(&[k], one(1), 1000, T0).unwrap().unwrap_err();
    assert_eq!(
        (r.limit, r.limit_value, r.remaining),
        (Limit::Concurrent, 2, 0)
    );
    assert_eq!(r.limit.code(), "rate_limit_exceeded");
    // A reservation that takes no concurrency slot still fits.
    let mut free = one(1);
    free.concurrent = false;
    assert!(t.reserve(&[k], free, 1000, T0).unwrap().is_ok());
    t.settle(a, actual(1), T0).unwrap();
    assert!(t.reserve(&[k], one(1), 1000, T0).unwrap().is_ok());
}

#[test]
fn gcra_requests_per_minute() {
    let t = table();
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Rpm, 60).unwrap();
    let mut free = one(0);
    free.concurrent = false;
    for i in 0..60 {
        assert!(
            t.reserve(&[k], free, 1000, T0).unwrap().is_ok(),
            "request {i}"
        );
    }
    let r = t.reserve(&[k], free, 1000, T0).unwrap().unwrap_err();
    assert_eq!((r.limit, r.limit_value, r.remaining), (Limit::Rpm, 60, 0));
    assert_eq!(r.retry_after_ns, Some(S));
    assert_eq!(r.reset_ns, Some(60 * S));
    // One request per second comes back.
    assert!(t.reserve(&[k], free, 1000, T0 + S - 1).unwrap().is_err());
    assert!(t.reserve(&[k], free, 1000, T0 + S).unwrap().is_ok());
    assert!(t.reserve(&[k], free, 1000, T0 + S).unwrap().is_err());
    let (rpm, tpm) = t.rate_status(k, T0 + 31 * S).unwrap();
    assert_eq!((rpm.limit, rpm.remaining, rpm.reset_ns), (60, 30, 30 * S));
    assert_eq!((tpm.limit, tpm.remaining), (UNLIMITED, UNLIMITED));
    // After a quiet minute the whole burst is available again, no more.
    for _ in 0..60 {
        assert!(t.reserve(&[k], free, 1000, T0 + 200 * S).unwrap().is_ok());
    }
    assert!(t.reserve(&[k], free, 1000, T0 + 200 * S).unwrap().is_err());
    t.set_limit(k, Limit::Rpm, 0).unwrap();
    let r = t
        .reserve(&[k], free, 1000, T0 + 900 * S)
        .unwrap()
        .unwrap_err();
    assert_eq!((r.limit, r.retry_after_ns), (Limit::Rpm, None));
}

#[test]
fn gcra_tokens_per_minute_is_corrected_at_settle() {
    let t = table();
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Tpm, 6_000).unwrap();
    let id = t.reserve(&[k], one(6_000), 1000, T0).unwrap().unwrap();
    let r = t.reserve(&[k], one(100), 1000, T0).unwrap().unwrap_err();
    assert_eq!(
        (r.limit, r.remaining, r.retry_after_ns),
        (Limit::Tpm, 0, Some(S))
    );
    // Only 1,000 of the 6,000 were used: 5,000 come back at once.
    t.settle(id, actual(1_000), T0).unwrap();
    assert_eq!(t.rate_status(k, T0).unwrap().1.remaining, 5_000);
    // A request larger than the limit never fits.
    let r = t.reserve(&[k], one(6_001), 1000, T0).unwrap().unwrap_err();
    assert_eq!(r.retry_after_ns, None);
    // Overruns are charged too.
    let id = t.reserve(&[k], one(1_000), 1000, T0).unwrap().unwrap();
    t.settle(id, actual(3_000), T0).unwrap();
    assert_eq!(t.rate_status(k, T0).unwrap().1.remaining, 2_000);
}

#[test]
fn expiry_releases_holds_and_a_late_settle_still_counts() {
    let t = table();
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Tokens, 100).unwrap();
    t.set_limit(k, Limit::Concurrent, 1).unwrap();
    let id = t.reserve(&[k], one(100), 50, T0).unwrap().unwrap();
    assert_eq!(t.expire_due(T0 + 49_000_000), 0);
    assert!(t.reserve(&[k], one(1), 50, T0).unwrap().is_err());
    assert_eq!(t.expire_due(T0 + 50_000_000), 1);
    assert_eq!(t.reservation_state(id).unwrap(), "expired");
    let snap = t.snapshot(k, T0).unwrap();
    assert_eq!((snap.tokens.held, snap.inflight), (0, 0));
    assert!(!t.cancel(id).unwrap());
    assert!(matches!(
        t.extend(id, 1, 0, 10, T0),
        Err(QuotaError::Finished {
            state: "expired",
            ..
        })
    ));
    // The request did finish after all: its usage is recorded, as overrun.
    let s = t.settle(id, actual(30), T0).unwrap();
    assert_eq!((s.late, s.overrun_tokens), (true, 30));
    let snap = t.snapshot(k, T0).unwrap();
    assert_eq!(
        (snap.tokens.used, snap.tokens.overrun, snap.requests.used),
        (30, 30, 1)
    );
    assert!(t.settle(id, actual(30), T0).is_err());
    let st = t.stats();
    assert_eq!((st.reserved, st.expired, st.late, st.settled), (1, 1, 1, 0));
    // Extending keeps a reservation alive.
    let id = t.reserve(&[k], one(10), 50, T0).unwrap().unwrap();
    assert_eq!(t.extend(id, 20, 0, 100, T0 + 40_000_000).unwrap(), None);
    assert_eq!(t.expire_due(T0 + 60_000_000), 0);
    assert_eq!(t.snapshot(k, T0).unwrap().tokens.held, 30);
    let r = t.extend(id, 100, 0, 100, T0).unwrap().unwrap();
    assert_eq!((r.limit, r.remaining), (Limit::Tokens, 40));
    t.settle(id, actual(25), T0).unwrap();
    assert_eq!(t.snapshot(k, T0).unwrap().tokens.used, 55);
}

#[test]
fn stale_and_forged_ids_are_rejected() {
    let t = QuotaTable::anonymous(4, 1).unwrap();
    let k = t.account("k").unwrap();
    let first = t.reserve(&[k], one(1), 1000, T0).unwrap().unwrap();
    assert!(matches!(
        t.reserve(&[k], one(1), 1000, T0),
        Err(QuotaError::ReservationsFull { capacity: 1 })
    ));
    // The failed reserve gave back what it took.
    assert_eq!(t.snapshot(k, T0).unwrap().tokens.held, 1);
    t.cancel(first).unwrap();
    let second = t.reserve(&[k], one(1), 1000, T0).unwrap().unwrap();
    assert_ne!(first, second);
    assert!(matches!(
        t.settle(first, actual(1), T0),
        Err(QuotaError::UnknownReservation(_))
    ));
    assert!(matches!(
        t.cancel(0),
        Err(QuotaError::UnknownReservation(_))
    ));
    assert!(matches!(
        t.cancel(second ^ 1 << 30),
        Err(QuotaError::UnknownReservation(_))
    ));
    t.settle(second, actual(1), T0).unwrap();
    // A full table expires what is due before giving up.
    let _held = t.reserve(&[k], one(1), 10, T0).unwrap().unwrap();
    assert!(t
        .reserve(&[k], one(1), 10, T0 + 10_000_000)
        .unwrap()
        .is_ok());
}

#[test]
fn threads_hammering_shared_accounts_keep_the_invariants() {
    const THREADS: usize = 8;
    const OPS: usize = 100_000;
    const LIMIT: u64 = 10_000;
    const TENANT_LIMIT: u64 = 15_000;
    const CONC: u64 = 40;
    let t = Arc::new(QuotaTable::anonymous(8, 1024).unwrap());
    let key = t.account("key").unwrap();
    let other = t.account("other-key").unwrap();
    let tenant = t.account("tenant").unwrap();
    for k in [key, other] {
        t.set_limit(k, Limit::Tokens, LIMIT).unwrap();
        t.set_limit(k, Limit::Concurrent, CONC).unwrap();
    }
    t.set_limit(tenant, Limit::Tokens, TENANT_LIMIT).unwrap();
    // A fake clock: 1 µs per operation, so doomed reservations (1 ms) expire during the run
    // and live ones (10 min) never do.
    let clock = Arc::new(AtomicU64::new(T0));
    let handles: Vec<_> = (0..THREADS)
        .map(|th| {
            let t = Arc::clone(&t);
            let clock = Arc::clone(&clock);
            std::thread::spawn(move || {
                // xorshift: deterministic per thread, no dependency.
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ th as u64;
                let mut rnd = move |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n
                };
                let mut live: Vec<(u64, u64)> = Vec::new();
                let (mut ok, mut refused, mut doomed) = (0u64, 0u64, 0u64);
                for _ in 0..OPS {
                    let now = clock.fetch_add(1_000, Relaxed);
                    match rnd(10) {
                        0..=4 if live.len() < 16 => {
                            let k = if rnd(2) == 0 { key } else { other };
                            let tokens = 1 + rnd(500);
                            let crash = rnd(50) == 0;
                            let ttl = if crash { 1 } else { 600_000 };
                            match t.reserve(&[k, tenant], one(tokens), ttl, now).unwrap() {
                                Ok(id) => {
                                    ok += 1;
                                    if crash {
                                        doomed += 1;
                                    } else {
                                        live.push((id, tokens));
                                    }
                                }
                                Err(r) => {
                                    refused += 1;
                                    assert!(r.account == tenant || r.account == k);
                                }
                            }
                            let s = t.snapshot(k, now).unwrap();
                            assert!(s.inflight <= CONC && s.tokens.used + s.tokens.held <= LIMIT);
                        }
                        0..=7 if !live.is_empty() => {
                            let (id, tokens) = live.swap_remove(rnd(live.len() as u64) as usize);
                            let s = t.settle(id, actual(rnd(tokens + 1)), now).unwrap();
                            assert_eq!((s.overrun_tokens, s.late), (0, false));
                        }
                        8 if !live.is_empty() => {
                            let (id, _) = live.swap_remove(rnd(live.len() as u64) as usize);
                            assert!(t.cancel(id).unwrap());
                        }
                        _ => {
                            if rnd(50) == 0 {
                                // A new period, now and then.
                                for (k, limit) in
                                    [(key, LIMIT), (other, LIMIT), (tenant, TENANT_LIMIT)]
                                {
                                    assert!(t.reset_used(k, Limit::Tokens).unwrap() <= limit);
                                }
                            }
                            if rnd(100) == 0 {
                                t.expire_due(now);
                            }
                        }
                    }
                }
                let now = clock.load(Relaxed);
                for (id, tokens) in live {
                    t.settle(id, actual(tokens), now).unwrap();
                }
                (ok, refused, doomed)
            })
        })
        .collect();
    let (mut admitted, mut refused, mut doomed) = (0, 0, 0);
    for h in handles {
        let (ok, no, d) = h.join().unwrap();
        admitted += ok;
        refused += no;
        doomed += d;
    }
    assert!(
        admitted > 50_000 && refused > 1_000,
        "{admitted} admitted, {refused} refused"
    );
    t.expire_due(clock.load(Relaxed) + 3600 * S);
    for k in [key, other, tenant] {
        let s = t.snapshot(k, T0).unwrap();
        assert_eq!(
            (s.tokens.held, s.inflight, s.tokens.overrun),
            (0, 0, 0),
            "{}",
            s.name
        );
        assert!(s.tokens.used <= s.tokens.limit);
    }
    let st = t.stats();
    assert_eq!(st.reserved, admitted);
    assert_eq!(st.held + st.busy, 0);
    assert_eq!(st.settled + st.cancelled + st.expired, admitted);
    assert_eq!((st.expired, st.late), (doomed, 0));
}

#[test]
fn threads_never_admit_more_than_the_limit() {
    // Every reservation is held to the end: exactly limit / amount are admitted, whatever the
    // interleaving.
    let t = Arc::new(QuotaTable::anonymous(4, 4096).unwrap());
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Tokens, 3_000).unwrap();
    let admitted: u64 = (0..4)
        .map(|_| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                (0..2_000)
                    .filter(|_| t.reserve(&[k], one(1), 60_000, T0).unwrap().is_ok())
                    .count() as u64
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    assert_eq!(admitted, 3_000);
    assert_eq!(t.stats().held, 3_000);
}

#[test]
fn an_absurd_overrun_saturates_and_blocks_a_rate_limit_for_at_most_a_window() {
    let t = table();
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Tpm, 6_000).unwrap();
    let id = t.reserve(&[k], one(100), 1000, T0).unwrap().unwrap();
    // An upstream's usage of 2^63 - 1 tokens: the TAT must not saturate to 584 years away.
    t.settle(id, actual(i64::MAX as u64), T0).unwrap();
    let r = t.reserve(&[k], one(100), 1000, T0).unwrap().unwrap_err();
    assert_eq!(r.limit, Limit::Tpm);
    let retry = r.retry_after_ns.unwrap();
    assert!(retry <= WINDOW_NS, "retry after {retry} ns");
    assert!(t.rate_status(k, T0).unwrap().1.reset_ns <= WINDOW_NS);
    // A minute later the key is admitted again.
    assert!(t
        .reserve(&[k], one(100), 1000, T0 + WINDOW_NS + S)
        .unwrap()
        .is_ok());
}

#[test]
fn budget_counters_saturate_instead_of_wrapping() {
    let t = table();
    let k = t.account("k").unwrap();
    t.set_limit(k, Limit::Tokens, 1_000).unwrap();
    // Unlimited money budget: charged must not wrap past u64::MAX back to a small number.
    t.charge(
        &[k],
        Amounts {
            tokens: u64::MAX - 5,
            money: u64::MAX,
            requests: 0,
            concurrent: false,
        },
        T0,
    )
    .unwrap();
    t.charge(
        &[k],
        Amounts {
            tokens: 10,
            money: 10,
            requests: 0,
            concurrent: false,
        },
        T0,
    )
    .unwrap();
    let s = t.snapshot(k, T0).unwrap();
    assert_eq!((s.tokens.used, s.money.used), (u64::MAX, u64::MAX));
    // Over its budget, not wrapped back under it: refused.
    let r = t.reserve(&[k], one(1), 1000, T0).unwrap().unwrap_err();
    assert_eq!(r.limit, Limit::Tokens);
    // A new day clears it all, and nothing underflows.
    t.reset_used(k, Limit::Tokens).unwrap();
    assert_eq!(t.release_used(k, Limit::Tokens, u64::MAX).unwrap(), 0);
    let s = t.snapshot(k, T0).unwrap();
    assert_eq!((s.tokens.used, s.tokens.held), (0, 0));
    assert!(t.reserve(&[k], one(1), 1000, T0).unwrap().is_ok());
}
