//! Quota: budgets, rate limits and concurrency per account, in a table that every worker
//! process of a gateway shares, so that `tokenhub serve --workers N` enforces one limit, not N.
//!
//! # The table
//!
//! A fixed-capacity file mapped `MAP_SHARED` (under /dev/shm, or any path): a 256-byte header
//! (magic, layout version, slot sizes, capacities, total size, a random secret), then the
//! account slots, then the reservation slots. The gateway's parent creates it before forking its
//! workers ([`QuotaTable::create`]: written beside the path and renamed into place, so nobody
//! ever maps a half-written table); workers [`QuotaTable::attach`] it, and an attach to a file
//! with another magic, version, slot layout or size fails with a message saying which. Every
//! shared field is an `AtomicU64` at an offset that is a multiple of 64; there are no pointers
//! in the file, so each process may map it anywhere. A table lives for one boot: deadlines and
//! rate-limit times are CLOCK_MONOTONIC, which is system-wide on Linux but restarts at boot.
//!
//! # Accounts
//!
//! An account is a slot found by name through an open-addressing index over the slots
//! themselves: the xxh3 hash of the name picks the first slot, probing is linear, and a new
//! account claims an empty slot by CAS (EMPTY -> CLAIMING), writes its hash, name (at most
//! [`NAME_MAX`] bytes) and limits, and publishes it with a release store (READY). Readers that
//! meet a CLAIMING slot wait for it (a few stores). Accounts are never removed; the gateway
//! keeps name -> index in a per-process dict and passes indexes afterwards. A new account has
//! every limit [`UNLIMITED`].
//!
//! Each account has:
//! - three budgets, [`Limit::Tokens`], [`Limit::Money`] (integer nano-units) and
//!   [`Limit::Requests`], each a `limit` and `charged` = held + used, plus `used` and `overrun`.
//!   Admission is one CAS loop on `charged` (`charged + amount <= limit`); because held and used
//!   share that word, settling (moving an amount from held to used) never opens a window for
//!   another request. Limits change at run time ([`QuotaTable::set_limit`]), budgets are topped
//!   up ([`QuotaTable::add_budget`]) and a new period starts with [`QuotaTable::reset_used`].
//! - a concurrency limit ([`Limit::Concurrent`]): a counter of requests in flight, taken by CAS
//!   at reserve and given back when the reservation ends.
//! - two rate limits, [`Limit::Rpm`] (cost 1 per request) and [`Limit::Tpm`] (cost = tokens),
//!   each a GCRA: one atomic theoretical arrival time (TAT, ns), advanced by CAS by
//!   `cost * 60 s / limit`, admitted while `TAT - now <= 60 s`. That is an exact token bucket of
//!   `limit` per minute refilled continuously, in one word. A fixed window admits twice the limit
//!   across a window boundary; a sliding log needs memory per request; the two-window sliding
//!   counter is an estimate and needs two words updated together. GCRA also gives the
//!   `x-ratelimit-*` figures directly: remaining = `(now + 60 s - TAT) * limit / 60 s`, reset =
//!   `TAT - now`.
//!
//! # Reservations
//!
//! [`QuotaTable::reserve`] takes, on each of up to four accounts (a key and its tenant, say), in
//! the order given: the concurrency slot, the rpm and tpm charges, then the three budgets. The
//! first step that does not fit refuses; every step already taken, on this account and on the
//! accounts before it, is given back, in reverse, and the call returns a [`Refusal`] naming the
//! account, the limit, its value, what remains and, for rate limits, when the request would fit
//! and when the limit is full again. Each step is linearizable on its own account (one CAS); a
//! reservation across accounts is not a single atomic action (another request may see the key
//! charged while the tenant refuses it, for a few nanoseconds), but the rollback is exact:
//! budgets and concurrency return precisely what was added, and a GCRA TAT moves back by the
//! same increment, which gives the state the request never happened (increments commute).
//! A refusal leaves no trace besides the account's `refused` counter.
//!
//! The admitted reservation is then recorded in a reservation slot: a state word
//! (generation << 8 | state: FREE, BUSY, HELD, SETTLED, CANCELLED, EXPIRED, LATE), the amounts,
//! the account indexes and a deadline (ms, CLOCK_MONOTONIC). Every transition is a CAS on the
//! state word; a call that changes a slot first moves it to BUSY (it then owns the fields), and
//! publishes the next state with a release store. A reservation id is the slot index (24 bits)
//! and the slot's generation (40 bits), XORed with the table's random secret: an id of a slot
//! reused since no longer matches its generation (`UnknownReservation`), and ids are not
//! guessable from one another (not a security boundary; the table trusts its processes).
//!
//! - [`QuotaTable::settle`]`(id, actual)`: per budget, `min(actual, reserved)` moves from held
//!   to used and the rest of the hold is released; `actual - reserved`, when positive, is added
//!   to `used` all the same (it was delivered: usage is never lost) and recorded in the account's
//!   `overrun`. So `used <= limit + overrun` (for a limit that was not lowered). The tpm charge
//!   is corrected to the actual tokens (refunded or increased), the rpm charge likewise to the
//!   actual requests, and the concurrency slot is given back.
//! - [`QuotaTable::cancel`]: gives everything back, rate-limit charges included.
//! - [`QuotaTable::extend`]: a stream reserves more tokens/money in tranches (same checks and
//!   rollback) and pushes its deadline out.
//! - [`QuotaTable::expire_due`]: a sweep (any process, any time, concurrent sweeps are fine)
//!   moves every HELD reservation past its deadline to EXPIRED and releases its holds and its
//!   concurrency slot; its rate-limit charges stay (the request probably happened). A crashed
//!   request therefore holds quota until its deadline at most. A settle that arrives after
//!   expiry still records the usage (all of it as overrun: nothing covered it any more), while
//!   the slot has not been reused; after that, [`QuotaTable::charge`] records usage without a
//!   reservation (the Python wrapper does that fallback).
//!
//! Every reservation therefore ends SETTLED, CANCELLED, EXPIRED or LATE (expired, then settled);
//! per-slot counters of each outcome and the generation (= reservations ever made in the slot)
//! let [`QuotaTable::stats`] prove it: reserved = settled + cancelled + expired + held.
//!
//! A process killed inside one of these calls (a window of ~100 ns) can leak what that one call
//! was moving, or leave a slot BUSY (reported as `Stuck` after a bounded wait); a process that
//! dies between calls, holding reservations, loses nothing: expiry reclaims them.
//!
//! Performance notes:
//! - No shared word is touched that the request does not need: the slot search starts at a
//!   per-thread cursor (no shared allocation counter), outcome counters live in the slot's own
//!   cache line, and the per-account counters sit beside the words the CAS already owns.
//!   Accounts and reservation slots are 64-byte aligned, so no two share a cache line.
//! - Memory orderings: counters are Relaxed (each is exact on its own: one word, one CAS or
//!   fetch_add); the slot state is Acquire/Release, publishing the fields written before it.
//! - Measured on the 2-core dev machine (examples/quota_bench.rs, benches/bench_quota.py), all
//!   six limits set: a reserve+settle pair on one account ~127 ns in Rust (7.9M pairs/s; the
//!   bar was 1M), ~210 ns on key + tenant; two threads on one account 6.3M pairs/s (its cache
//!   line moves between cores), on separate accounts 15M; two processes on one account 6.4M.
//!   From Python ~270 ns per pair (3.8M/s, ~70 ns of call overhead per call); a reserve call
//!   ~0.2 µs at p50 and < 0.3 µs at p99.9. The alternatives measured beside it: a Python dict
//!   under a threading.Lock 1.1M pairs/s (and per process only), a multiprocessing.Lock over
//!   shared memory 0.8M, Redis with Lua scripts 5-11k (a reserve ~90 µs).
//! - The per-request calls keep the GIL: with `py.detach` around reserve and settle one thread
//!   ran the same and two threads 25-50% slower (handing the GIL over costs more than the
//!   call). The O(capacity) calls (`expire_due`, `stats`) and create/attach release it.

pub mod error;
mod shm;

pub use error::{QuotaError, Result};
pub use shm::{MAX_ACCOUNTS, MAX_RESERVATIONS, NAME_MAX};

use shm::{
    AccountSlot, BudgetCell, GcraCell, Mapping, ResSlot, ACC_CLAIMING, ACC_EMPTY, ACC_READY,
    RES_BUSY, RES_CANCELLED, RES_EXPIRED, RES_FREE, RES_HELD, RES_LATE, RES_SETTLED,
};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// A limit that admits everything (the default of every limit of a new account).
pub const UNLIMITED: u64 = u64::MAX;
/// The rate limits' window: limits are per minute.
pub const WINDOW_NS: u64 = 60_000_000_000;
/// Most accounts one reservation can span.
pub const MAX_ACCOUNTS_PER_RESERVATION: usize = 4;

const STATE_MASK: u64 = 0xff;
/// The generation bits a reservation id keeps.
const ID_GEN_BITS: u32 = 40;
const ID_GEN_MASK: u64 = (1 << ID_GEN_BITS) - 1;
const ID_SLOT_BITS: u32 = 24;
/// Spins (mostly yields) before a slot that stays CLAIMING or BUSY is reported stuck.
const STUCK_SPINS: u32 = 1 << 22;

/// What a reservation can be refused by, and what `set_limit` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Token budget (held + used per period).
    Tokens,
    /// Money budget, in integer nano-units of the tenant's currency.
    Money,
    /// Request budget (held + used per period).
    Requests,
    /// Requests (or streams) in flight at once.
    Concurrent,
    /// Requests per minute (GCRA).
    Rpm,
    /// Tokens per minute (GCRA, cost = reserved tokens, corrected at settle).
    Tpm,
}

impl Limit {
    pub const ALL: [Limit; 6] = [
        Limit::Tokens,
        Limit::Money,
        Limit::Requests,
        Limit::Concurrent,
        Limit::Rpm,
        Limit::Tpm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Limit::Tokens => "tokens",
            Limit::Money => "money",
            Limit::Requests => "requests",
            Limit::Concurrent => "concurrent",
            Limit::Rpm => "rpm",
            Limit::Tpm => "tpm",
        }
    }

    pub fn parse(name: &str) -> Result<Limit> {
        Limit::ALL
            .into_iter()
            .find(|l| l.name() == name)
            .ok_or_else(|| {
                QuotaError::Invalid(format!(
                    "unknown limit {name:?} (expected tokens, money, requests, concurrent, rpm or tpm)"
                ))
            })
    }

    /// Budgets run out until topped up or reset; the others recover by themselves.
    pub fn is_budget(self) -> bool {
        self.budget_index().is_some()
    }

    /// The OpenAI error code for a refusal by this limit (HTTP 429 either way).
    pub fn code(self) -> &'static str {
        if self.is_budget() {
            "insufficient_quota"
        } else {
            "rate_limit_exceeded"
        }
    }

    fn budget_index(self) -> Option<usize> {
        match self {
            Limit::Tokens => Some(0),
            Limit::Money => Some(1),
            Limit::Requests => Some(2),
            _ => None,
        }
    }
}

/// What one reservation takes from each of its accounts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Upper bound of the request's tokens (prompt + max output): budget and tpm.
    pub tokens: u64,
    /// Upper bound of its price, nano-units.
    pub money: u64,
    /// Requests (usually 1): budget and rpm. At most `u32::MAX`.
    pub requests: u64,
    /// Takes one concurrency slot.
    pub concurrent: bool,
}

/// What a settle records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actual {
    pub tokens: u64,
    pub money: u64,
    /// `None`: the requests reserved.
    pub requests: Option<u64>,
}

/// Why a reservation or an extension was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Index of the account that refused.
    pub account: u32,
    pub limit: Limit,
    /// The limit's value.
    pub limit_value: u64,
    /// What is left of it now (requests or tokens for rate limits, at this instant).
    pub remaining: u64,
    /// Rate limits: in how long this request would fit (`None`: never, it exceeds the limit
    /// on its own). Budgets and concurrency: `None`.
    pub retry_after_ns: Option<u64>,
    /// Rate limits: in how long the limit is full again. Others: `None`.
    pub reset_ns: Option<u64>,
}

/// What a settle did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Usage beyond the reservation (on each account of the reservation).
    pub overrun_tokens: u64,
    pub overrun_money: u64,
    /// The reservation had expired: everything was recorded as overrun.
    pub late: bool,
}

/// A budget's state. `held` is `charged - used`, read without a lock: exact when no call is
/// in flight on the account, within one call's amounts otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetSnapshot {
    pub limit: u64,
    pub used: u64,
    pub held: u64,
    pub overrun: u64,
}

/// A rate limit's state, as the `x-ratelimit-*` headers want it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is full again.
    pub reset_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountSnapshot {
    pub index: u32,
    pub name: String,
    pub tokens: BudgetSnapshot,
    pub money: BudgetSnapshot,
    pub requests: BudgetSnapshot,
    pub concurrent_limit: u64,
    pub inflight: u64,
    pub rpm: RateStatus,
    pub tpm: RateStatus,
    pub admitted: u64,
    pub refused: u64,
}

/// Counts over the whole table, from one pass over its slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub account_capacity: u32,
    pub accounts: u32,
    pub reservation_capacity: u32,
    /// Slots by current state: held (live reservations), busy (mid-call), the rest free.
    pub held: u64,
    pub busy: u64,
    pub free: u64,
    /// Reservations ever made, and how those that ended did.
    pub reserved: u64,
    pub settled: u64,
    pub cancelled: u64,
    pub expired: u64,
    /// Of the expired, settled afterwards.
    pub late: u64,
}

/// CLOCK_MONOTONIC in ns: the same clock in every process of the machine.
pub fn clock_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: t is a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn state_name(st: u64) -> &'static str {
    match st {
        RES_FREE => "free",
        RES_BUSY => "busy",
        RES_HELD => "held",
        RES_SETTLED => "settled",
        RES_CANCELLED => "cancelled",
        RES_EXPIRED => "expired",
        RES_LATE => "settled after expiry",
        _ => "corrupt",
    }
}

// -- the per-account primitives --------------------------------------------------------------

/// Why one step refused: (limit, remaining, retry_after_ns, reset_ns).
type StepRefusal = (u64, u64, Option<u64>, Option<u64>);

fn budget_take(cell: &BudgetCell, amount: u64) -> std::result::Result<(), StepRefusal> {
    if amount == 0 {
        return Ok(());
    }
    let limit = cell.limit.load(Relaxed);
    if limit == UNLIMITED {
        sat_add(&cell.charged, amount);
        return Ok(());
    }
    let mut cur = cell.charged.load(Relaxed);
    loop {
        match cur.checked_add(amount) {
            Some(next) if next <= limit => {
                match cell
                    .charged
                    .compare_exchange_weak(cur, next, Relaxed, Relaxed)
                {
                    Ok(_) => return Ok(()),
                    Err(actual) => cur = actual,
                }
            }
            _ => return Err((limit, limit.saturating_sub(cur), None, None)),
        }
    }
}

// Counters saturate instead of wrapping: one absurd figure (an upstream's usage of 2^63
// tokens) must not wrap a budget back to "nothing used", nor a subtraction wrap it to "all".
fn sat_add(cell: &AtomicU64, amount: u64) {
    if amount != 0 {
        let _ = cell.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(amount)));
    }
}

fn sat_sub(cell: &AtomicU64, amount: u64) {
    if amount != 0 {
        let _ = cell.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(amount)));
    }
}

fn budget_release(cell: &BudgetCell, amount: u64) {
    sat_sub(&cell.charged, amount);
}

/// Moves `actual` of a `reserved` hold to used; returns the overrun.
fn budget_settle(cell: &BudgetCell, reserved: u64, actual: u64) -> u64 {
    let mut over = 0;
    if actual < reserved {
        sat_sub(&cell.charged, reserved - actual);
    } else if actual > reserved {
        over = actual - reserved;
        sat_add(&cell.charged, over);
        sat_add(&cell.overrun, over);
    }
    sat_add(&cell.used, actual);
    over
}

/// Records usage nothing held.
fn budget_charge(cell: &BudgetCell, amount: u64) {
    sat_add(&cell.charged, amount);
    sat_add(&cell.overrun, amount);
    sat_add(&cell.used, amount);
}

fn conc_take(slot: &AccountSlot) -> std::result::Result<(), StepRefusal> {
    let limit = slot.conc_limit.load(Relaxed);
    if limit == UNLIMITED {
        slot.conc_inflight.fetch_add(1, Relaxed);
        return Ok(());
    }
    let mut cur = slot.conc_inflight.load(Relaxed);
    loop {
        if cur >= limit {
            return Err((limit, 0, None, None));
        }
        match slot
            .conc_inflight
            .compare_exchange_weak(cur, cur + 1, Relaxed, Relaxed)
        {
            Ok(_) => return Ok(()),
            Err(actual) => cur = actual,
        }
    }
}

fn conc_release(slot: &AccountSlot) {
    slot.conc_inflight.fetch_sub(1, Relaxed);
}

/// The TAT increment for `cost` at `limit` per minute (`None`: nothing to charge, or a limit
/// of 0, which `gcra_take` refuses outright and nothing else may push the TAT for).
fn gcra_inc(limit: u64, cost: u64) -> Option<u64> {
    if cost == 0 || limit == UNLIMITED || limit == 0 {
        return None;
    }
    let inc = cost as u128 * WINDOW_NS as u128 / limit as u128;
    Some(u64::try_from(inc).unwrap_or(u64::MAX))
}

fn gcra_remaining(limit: u64, base: u64, now: u64) -> u64 {
    let room = (now + WINDOW_NS).saturating_sub(base);
    let n = room as u128 * limit as u128 / WINDOW_NS as u128;
    u64::try_from(n).unwrap_or(u64::MAX).min(limit)
}

fn gcra_take(cell: &GcraCell, cost: u64, now: u64) -> std::result::Result<(), StepRefusal> {
    let limit = cell.limit.load(Relaxed);
    if limit == 0 && cost != 0 {
        return Err((0, 0, None, None));
    }
    let Some(inc) = gcra_inc(limit, cost) else {
        return Ok(());
    };
    let mut tat = cell.tat.load(Relaxed);
    loop {
        let base = tat.max(now);
        let next = base.saturating_add(inc);
        if next - now > WINDOW_NS {
            let retry = (inc <= WINDOW_NS).then(|| next - now - WINDOW_NS);
            return Err((
                limit,
                gcra_remaining(limit, base, now),
                retry,
                Some(base - now),
            ));
        }
        match cell.tat.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
            Ok(_) => return Ok(()),
            Err(actual) => tat = actual,
        }
    }
}

/// Takes back a charge of `cost` (a cancelled or over-estimated request).
fn gcra_refund(cell: &GcraCell, cost: u64) {
    let Some(inc) = gcra_inc(cell.limit.load(Relaxed), cost) else {
        return;
    };
    let _ = cell
        .tat
        .fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_sub(inc)));
}

/// Charges `cost` unconditionally (usage beyond what was admitted). The debt is capped at one
/// window: a rate limit is per minute, so however large the overrun the account is full for
/// at most a minute (a retry-after of at most 60 s, not 584 years for a saturated TAT);
/// holding a tenant to its totals is what budgets are for.
fn gcra_add(cell: &GcraCell, cost: u64, now: u64) {
    let Some(inc) = gcra_inc(cell.limit.load(Relaxed), cost) else {
        return;
    };
    let cap = now.saturating_add(WINDOW_NS);
    let _ = cell.tat.fetch_update(Relaxed, Relaxed, |t| {
        Some(t.max(now).saturating_add(inc).min(cap))
    });
}

fn gcra_adjust(cell: &GcraCell, reserved: u64, actual: u64, now: u64) {
    if actual < reserved {
        gcra_refund(cell, reserved - actual);
    } else if actual > reserved {
        gcra_add(cell, actual - reserved, now);
    }
}

fn gcra_status(cell: &GcraCell, now: u64) -> RateStatus {
    let limit = cell.limit.load(Relaxed);
    if limit == UNLIMITED {
        return RateStatus {
            limit,
            remaining: UNLIMITED,
            reset_ns: 0,
        };
    }
    let base = cell.tat.load(Relaxed).max(now);
    RateStatus {
        limit,
        remaining: gcra_remaining(limit, base, now),
        reset_ns: base - now,
    }
}

/// The steps of taking `a` from one account, in order.
const STEPS: [Limit; 6] = [
    Limit::Concurrent,
    Limit::Rpm,
    Limit::Tpm,
    Limit::Tokens,
    Limit::Money,
    Limit::Requests,
];

fn take_step(
    s: &AccountSlot,
    step: Limit,
    a: &Amounts,
    now: u64,
) -> std::result::Result<(), StepRefusal> {
    match step {
        Limit::Concurrent if a.concurrent => conc_take(s),
        Limit::Concurrent => Ok(()),
        Limit::Rpm => gcra_take(&s.rpm, a.requests, now),
        Limit::Tpm => gcra_take(&s.tpm, a.tokens, now),
        Limit::Tokens => budget_take(&s.budgets[0], a.tokens),
        Limit::Money => budget_take(&s.budgets[1], a.money),
        Limit::Requests => budget_take(&s.budgets[2], a.requests),
    }
}

fn undo_step(s: &AccountSlot, step: Limit, a: &Amounts) {
    match step {
        Limit::Concurrent if a.concurrent => conc_release(s),
        Limit::Concurrent => {}
        Limit::Rpm => gcra_refund(&s.rpm, a.requests),
        Limit::Tpm => gcra_refund(&s.tpm, a.tokens),
        Limit::Tokens => budget_release(&s.budgets[0], a.tokens),
        Limit::Money => budget_release(&s.budgets[1], a.money),
        Limit::Requests => budget_release(&s.budgets[2], a.requests),
    }
}

/// Takes `a` from one account, all steps or none.
fn take_account(
    s: &AccountSlot,
    index: u32,
    a: &Amounts,
    now: u64,
) -> std::result::Result<(), Refusal> {
    for (i, &step) in STEPS.iter().enumerate() {
        if let Err((limit_value, remaining, retry_after_ns, reset_ns)) = take_step(s, step, a, now)
        {
            for &prev in STEPS[..i].iter().rev() {
                undo_step(s, prev, a);
            }
            s.refused.fetch_add(1, Relaxed);
            return Err(Refusal {
                account: index,
                limit: step,
                limit_value,
                remaining,
                retry_after_ns,
                reset_ns,
            });
        }
    }
    Ok(())
}

fn untake_account(s: &AccountSlot, a: &Amounts) {
    for &step in STEPS.iter().rev() {
        undo_step(s, step, a);
    }
}

// -- the per-thread slot cursor --------------------------------------------------------------

fn cursor_seed() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Threads (and processes) start their slot searches far apart.
    NEXT.fetch_add(0x9E37_79B9, Relaxed) ^ std::process::id().wrapping_mul(0x85EB_CA6B)
}

thread_local! {
    static CURSOR: Cell<u32> = Cell::new(cursor_seed());
}

/// Spins on a word that another call is about to change, yielding after a while.
fn backoff(spins: &mut u32) -> bool {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *spins < STUCK_SPINS
}

/// Reservation slot state words.
fn st(word: u64) -> u64 {
    word & STATE_MASK
}

fn with_state(word: u64, state: u64) -> u64 {
    (word & !STATE_MASK) | state
}

/// The shared quota table (see the module documentation).
pub struct QuotaTable {
    map: Mapping,
    path: Option<PathBuf>,
    account_capacity: u32,
    reservation_capacity: u32,
    secret: u64,
}

impl QuotaTable {
    /// Creates a fresh table at `path` (replacing any file there; processes that mapped the old
    /// one keep it).
    pub fn create(path: &Path, accounts: u32, reservations: u32) -> Result<QuotaTable> {
        let map = shm::create(path, accounts, reservations)?;
        Ok(Self::from_map(
            map,
            Some(path.to_path_buf()),
            accounts,
            reservations,
        ))
    }

    /// Maps the table another process created at `path`.
    pub fn attach(path: &Path) -> Result<QuotaTable> {
        let (map, accounts, reservations) = shm::attach(path)?;
        Ok(Self::from_map(
            map,
            Some(path.to_path_buf()),
            accounts,
            reservations,
        ))
    }

    /// A table in anonymous shared memory (threads of this process, and children it forks).
    pub fn anonymous(accounts: u32, reservations: u32) -> Result<QuotaTable> {
        let map = shm::anonymous(accounts, reservations)?;
        Ok(Self::from_map(map, None, accounts, reservations))
    }

    fn from_map(map: Mapping, path: Option<PathBuf>, accounts: u32, reservations: u32) -> Self {
        let secret = map.header().secret.load(Relaxed);
        QuotaTable {
            map,
            path,
            account_capacity: accounts,
            reservation_capacity: reservations,
            secret,
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn account_capacity(&self) -> u32 {
        self.account_capacity
    }

    pub fn reservation_capacity(&self) -> u32 {
        self.reservation_capacity
    }

    #[inline]
    fn accounts(&self) -> &[AccountSlot] {
        // SAFETY: the mapping was sized and checked for these capacities.
        unsafe {
            self.map
                .regions(self.account_capacity, self.reservation_capacity)
                .0
        }
    }

    #[inline]
    fn slots(&self) -> &[ResSlot] {
        // SAFETY: as above.
        unsafe {
            self.map
                .regions(self.account_capacity, self.reservation_capacity)
                .1
        }
    }

    // -- accounts --------------------------------------------------------------------------

    /// The index of the account `name`, created (with every limit unlimited) if new.
    pub fn account(&self, name: &str) -> Result<u32> {
        self.lookup(name, true)?.ok_or(QuotaError::AccountsFull {
            capacity: self.account_capacity,
        })
    }

    /// The index of the account `name`, if it exists.
    pub fn find_account(&self, name: &str) -> Result<Option<u32>> {
        self.lookup(name, false)
    }

    fn lookup(&self, name: &str, create: bool) -> Result<Option<u32>> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > NAME_MAX {
            return Err(QuotaError::Invalid(format!(
                "an account name is 1 to {NAME_MAX} bytes, not {}",
                bytes.len()
            )));
        }
        let words = shm::name_words(bytes);
        let hash = xxhash_rust::xxh3::xxh3_64(bytes);
        let accounts = self.accounts();
        let cap = accounts.len();
        let start = (hash % cap as u64) as usize;
        for i in 0..cap {
            let index = (start + i) % cap;
            let slot = &accounts[index];
            let mut state = slot.state.load(Acquire);
            if state == ACC_EMPTY {
                if !create {
                    return Ok(None);
                }
                match slot
                    .state
                    .compare_exchange(ACC_EMPTY, ACC_CLAIMING, Acquire, Acquire)
                {
                    Ok(_) => {
                        slot.hash.store(hash, Relaxed);
                        slot.name_len.store(bytes.len() as u64, Relaxed);
                        for (w, &v) in slot.name.iter().zip(words.iter()) {
                            w.store(v, Relaxed);
                        }
                        for b in &slot.budgets {
                            b.limit.store(UNLIMITED, Relaxed);
                        }
                        slot.conc_limit.store(UNLIMITED, Relaxed);
                        slot.rpm.limit.store(UNLIMITED, Relaxed);
                        slot.tpm.limit.store(UNLIMITED, Relaxed);
                        self.map.header().accounts_in_use.fetch_add(1, Relaxed);
                        slot.state.store(ACC_READY, Release);
                        return Ok(Some(index as u32));
                    }
                    Err(now) => state = now,
                }
            }
            let mut spins = 0;
            while state == ACC_CLAIMING {
                if !backoff(&mut spins) {
                    return Err(QuotaError::Stuck {
                        what: "account",
                        index: index as u32,
                    });
                }
                state = slot.state.load(Acquire);
            }
            if slot.hash.load(Relaxed) == hash
                && slot.name_len.load(Relaxed) == bytes.len() as u64
                && slot
                    .name
                    .iter()
                    .zip(words.iter())
                    .all(|(w, &v)| w.load(Relaxed) == v)
            {
                return Ok(Some(index as u32));
            }
        }
        Ok(None)
    }

    fn slot(&self, index: u32) -> Result<&AccountSlot> {
        self.accounts()
            .get(index as usize)
            .filter(|s| s.state.load(Acquire) == ACC_READY)
            .ok_or_else(|| QuotaError::Invalid(format!("no account with index {index}")))
    }

    /// The name of the account at `index`.
    pub fn account_name(&self, index: u32) -> Result<String> {
        Ok(shm::read_name(self.slot(index)?))
    }

    pub fn set_limit(&self, index: u32, limit: Limit, value: u64) -> Result<()> {
        let s = self.slot(index)?;
        let word = match limit {
            Limit::Concurrent => &s.conc_limit,
            Limit::Rpm => &s.rpm.limit,
            Limit::Tpm => &s.tpm.limit,
            _ => &s.budgets[limit.budget_index().unwrap_or_default()].limit,
        };
        word.store(value, Relaxed);
        Ok(())
    }

    pub fn get_limit(&self, index: u32, limit: Limit) -> Result<u64> {
        let s = self.slot(index)?;
        Ok(match limit {
            Limit::Concurrent => s.conc_limit.load(Relaxed),
            Limit::Rpm => s.rpm.limit.load(Relaxed),
            Limit::Tpm => s.tpm.limit.load(Relaxed),
            _ => s.budgets[limit.budget_index().unwrap_or_default()]
                .limit
                .load(Relaxed),
        })
    }

    fn budget(&self, index: u32, limit: Limit) -> Result<&BudgetCell> {
        let s = self.slot(index)?;
        let i = limit.budget_index().ok_or_else(|| {
            QuotaError::Invalid(format!(
                "{} is a rate or concurrency limit, not a budget (tokens, money, requests)",
                limit.name()
            ))
        })?;
        Ok(&s.budgets[i])
    }

    /// Raises (or, negative, lowers) a budget's limit; an unlimited budget stays unlimited.
    /// Returns the new limit.
    pub fn add_budget(&self, index: u32, limit: Limit, delta: i64) -> Result<u64> {
        let cell = self.budget(index, limit)?;
        let old = cell
            .limit
            .fetch_update(Relaxed, Relaxed, |l| {
                (l != UNLIMITED).then(|| l.saturating_add_signed(delta).min(UNLIMITED - 1))
            })
            .unwrap_or(UNLIMITED);
        Ok(if old == UNLIMITED {
            UNLIMITED
        } else {
            old.saturating_add_signed(delta).min(UNLIMITED - 1)
        })
    }

    /// Starts a new period for a budget: clears `used` and `overrun` (holds stay). Returns the
    /// `used` cleared. Exact when no settle is in flight on the account; a concurrent settle's
    /// amount lands in one period or the other, never in both or neither.
    pub fn reset_used(&self, index: u32, limit: Limit) -> Result<u64> {
        let cell = self.budget(index, limit)?;
        let used = cell.used.swap(0, Relaxed);
        sat_sub(&cell.charged, used);
        cell.overrun.store(0, Relaxed);
        Ok(used)
    }

    /// Gives back `amount` of a budget's `used` (at most what is used): for usage that was
    /// counted here and has since been accounted for elsewhere (the gateway's money pots are
    /// released once the ledger has posted what they charged). Returns the amount released.
    pub fn release_used(&self, index: u32, limit: Limit, amount: u64) -> Result<u64> {
        let cell = self.budget(index, limit)?;
        let mut done = 0;
        let _ = cell.used.fetch_update(Relaxed, Relaxed, |u| {
            done = u.min(amount);
            Some(u - done)
        });
        sat_sub(&cell.charged, done);
        Ok(done)
    }

    fn check_accounts(&self, accounts: &[u32]) -> Result<()> {
        if accounts.is_empty() || accounts.len() > MAX_ACCOUNTS_PER_RESERVATION {
            return Err(QuotaError::Invalid(format!(
                "a reservation spans 1 to {MAX_ACCOUNTS_PER_RESERVATION} accounts, not {}",
                accounts.len()
            )));
        }
        for (i, &a) in accounts.iter().enumerate() {
            self.slot(a)?;
            if accounts[..i].contains(&a) {
                return Err(QuotaError::Invalid(format!(
                    "account {a} appears twice in one reservation"
                )));
            }
        }
        Ok(())
    }

    // -- reservations ----------------------------------------------------------------------

    /// Takes `amounts` from every account in `accounts` (in order; all or none) and records a
    /// reservation that expires `ttl_ms` after `now_ns` unless settled, cancelled or extended.
    /// Returns its id, or the refusal.
    pub fn reserve(
        &self,
        accounts: &[u32],
        amounts: Amounts,
        ttl_ms: u64,
        now_ns: u64,
    ) -> Result<std::result::Result<u64, Refusal>> {
        self.check_accounts(accounts)?;
        if amounts.requests > u32::MAX as u64 {
            return Err(QuotaError::Invalid(format!(
                "{} requests in one reservation (at most {})",
                amounts.requests,
                u32::MAX
            )));
        }
        let table = self.accounts();
        for (i, &index) in accounts.iter().enumerate() {
            if let Err(refusal) = take_account(&table[index as usize], index, &amounts, now_ns) {
                for &prev in accounts[..i].iter().rev() {
                    untake_account(&table[prev as usize], &amounts);
                }
                return Ok(Err(refusal));
            }
        }
        let claimed = match self.claim_slot() {
            Some(c) => Some(c),
            None => {
                self.expire_due(now_ns);
                self.claim_slot()
            }
        };
        let Some((slot_index, word)) = claimed else {
            for &index in accounts.iter().rev() {
                untake_account(&table[index as usize], &amounts);
            }
            return Err(QuotaError::ReservationsFull {
                capacity: self.reservation_capacity,
            });
        };
        for &index in accounts {
            table[index as usize].admitted.fetch_add(1, Relaxed);
        }
        let slot = &self.slots()[slot_index as usize];
        slot.deadline_ms
            .store((now_ns / 1_000_000).saturating_add(ttl_ms), Relaxed);
        slot.tokens.store(amounts.tokens, Relaxed);
        slot.money.store(amounts.money, Relaxed);
        slot.misc.store(
            amounts.requests | (amounts.concurrent as u64) << 32 | (accounts.len() as u64) << 40,
            Relaxed,
        );
        let mut packed = [0u64; 2];
        for (i, &a) in accounts.iter().enumerate() {
            packed[i / 2] |= (a as u64) << (32 * (i % 2));
        }
        slot.accounts[0].store(packed[0], Relaxed);
        slot.accounts[1].store(packed[1], Relaxed);
        slot.state.store(with_state(word, RES_HELD), Release);
        Ok(Ok(self.encode_id(slot_index, word >> 8)))
    }

    /// Takes a free (or ended) slot: its state word is then BUSY with the next generation.
    fn claim_slot(&self) -> Option<(u32, u64)> {
        let slots = self.slots();
        let cap = slots.len() as u32;
        let start = CURSOR.with(|c| c.get()) % cap;
        for i in 0..cap {
            let mut index = start + i;
            if index >= cap {
                index -= cap;
            }
            let slot = &slots[index as usize];
            let word = slot.state.load(Relaxed);
            if matches!(st(word), RES_BUSY | RES_HELD) {
                continue;
            }
            let gen = ((word >> 8) + 1) & (u64::MAX >> 8);
            let next = gen << 8 | RES_BUSY;
            if slot
                .state
                .compare_exchange(word, next, Acquire, Relaxed)
                .is_ok()
            {
                CURSOR.with(|c| c.set(index.wrapping_add(1)));
                return Some((index, next));
            }
        }
        None
    }

    fn encode_id(&self, slot: u32, gen: u64) -> u64 {
        ((gen & ID_GEN_MASK) << ID_SLOT_BITS | slot as u64) ^ self.secret
    }

    fn decode_id(&self, id: u64) -> Result<(&ResSlot, u64)> {
        let raw = id ^ self.secret;
        let slot = (raw & ((1 << ID_SLOT_BITS) - 1)) as usize;
        let gen = raw >> ID_SLOT_BITS;
        match self.slots().get(slot) {
            Some(s) if gen != 0 => Ok((s, gen)),
            _ => Err(QuotaError::UnknownReservation(id)),
        }
    }

    /// Moves the reservation `id` from one of `from` to BUSY; returns the state word it had.
    fn own(&self, id: u64, from: &[u64]) -> Result<(&ResSlot, u64)> {
        let (slot, gen) = self.decode_id(id)?;
        let mut spins = 0;
        loop {
            let word = slot.state.load(Acquire);
            if (word >> 8) & ID_GEN_MASK != gen || st(word) == RES_FREE {
                return Err(QuotaError::UnknownReservation(id));
            }
            let state = st(word);
            if state == RES_BUSY {
                if !backoff(&mut spins) {
                    return Err(QuotaError::Stuck {
                        what: "reservation",
                        index: ((id ^ self.secret) & ((1 << ID_SLOT_BITS) - 1)) as u32,
                    });
                }
                continue;
            }
            if !from.contains(&state) {
                return Err(QuotaError::Finished {
                    id,
                    state: state_name(state),
                });
            }
            if slot
                .state
                .compare_exchange(word, with_state(word, RES_BUSY), Acquire, Relaxed)
                .is_ok()
            {
                return Ok((slot, word));
            }
        }
    }

    /// The amounts and accounts recorded in a slot the caller owns.
    fn read_slot(slot: &ResSlot) -> (Amounts, [u32; MAX_ACCOUNTS_PER_RESERVATION], usize) {
        let misc = slot.misc.load(Relaxed);
        let amounts = Amounts {
            tokens: slot.tokens.load(Relaxed),
            money: slot.money.load(Relaxed),
            requests: misc & 0xffff_ffff,
            concurrent: (misc >> 32) & 0xff != 0,
        };
        let n = (((misc >> 40) & 0xff) as usize).min(MAX_ACCOUNTS_PER_RESERVATION);
        let packed = [
            slot.accounts[0].load(Relaxed),
            slot.accounts[1].load(Relaxed),
        ];
        let mut accounts = [0u32; MAX_ACCOUNTS_PER_RESERVATION];
        for (i, a) in accounts.iter_mut().enumerate() {
            *a = (packed[i / 2] >> (32 * (i % 2))) as u32;
        }
        (amounts, accounts, n)
    }

    /// Ends a reservation with the usage it really had. See the module documentation.
    pub fn settle(&self, id: u64, actual: Actual, now_ns: u64) -> Result<Settlement> {
        let (slot, word) = self.own(id, &[RES_HELD, RES_EXPIRED])?;
        let (held, accounts, n) = Self::read_slot(slot);
        let table = self.accounts();
        let requests = actual.requests.unwrap_or(held.requests);
        let late = st(word) == RES_EXPIRED;
        let mut out = Settlement {
            late,
            ..Settlement::default()
        };
        for &index in &accounts[..n] {
            let s = &table[index as usize];
            if late {
                // The holds were released at expiry: everything delivered is an overrun.
                budget_charge(&s.budgets[0], actual.tokens);
                budget_charge(&s.budgets[1], actual.money);
                budget_charge(&s.budgets[2], requests);
                out.overrun_tokens = actual.tokens;
                out.overrun_money = actual.money;
            } else {
                out.overrun_tokens = budget_settle(&s.budgets[0], held.tokens, actual.tokens);
                out.overrun_money = budget_settle(&s.budgets[1], held.money, actual.money);
                budget_settle(&s.budgets[2], held.requests, requests);
                if held.concurrent {
                    conc_release(s);
                }
            }
            // Expiry kept the rate charges, so both paths correct them the same way.
            gcra_adjust(&s.tpm, held.tokens, actual.tokens, now_ns);
            gcra_adjust(&s.rpm, held.requests, requests, now_ns);
        }
        let (counter, next) = if late {
            (&slot.late, RES_LATE)
        } else {
            (&slot.settled, RES_SETTLED)
        };
        counter.store(counter.load(Relaxed) + 1, Relaxed);
        slot.state.store(with_state(word, next), Release);
        Ok(out)
    }

    /// Gives back everything a reservation took, rate-limit charges included. Returns false
    /// when it had already expired (its holds were released then; nothing more to do).
    pub fn cancel(&self, id: u64) -> Result<bool> {
        let (slot, word) = match self.own(id, &[RES_HELD]) {
            Ok(owned) => owned,
            Err(QuotaError::Finished { state, .. }) if state == state_name(RES_EXPIRED) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        let (held, accounts, n) = Self::read_slot(slot);
        let table = self.accounts();
        for &index in accounts[..n].iter().rev() {
            untake_account(&table[index as usize], &held);
        }
        slot.cancelled
            .store(slot.cancelled.load(Relaxed) + 1, Relaxed);
        slot.state.store(with_state(word, RES_CANCELLED), Release);
        Ok(true)
    }

    /// Reserves `more_tokens` and `more_money` on top of a live reservation (a stream's next
    /// tranche; budgets and tpm, all accounts or none) and moves its deadline to at least
    /// `ttl_ms` from now, refused or not. Zero amounts just push the deadline.
    pub fn extend(
        &self,
        id: u64,
        more_tokens: u64,
        more_money: u64,
        ttl_ms: u64,
        now_ns: u64,
    ) -> Result<Option<Refusal>> {
        let (slot, word) = self.own(id, &[RES_HELD])?;
        let (_, accounts, n) = Self::read_slot(slot);
        let more = Amounts {
            tokens: more_tokens,
            money: more_money,
            requests: 0,
            concurrent: false,
        };
        let table = self.accounts();
        let mut refusal = None;
        for (i, &index) in accounts[..n].iter().enumerate() {
            if let Err(r) = take_account(&table[index as usize], index, &more, now_ns) {
                for &prev in accounts[..i].iter().rev() {
                    untake_account(&table[prev as usize], &more);
                }
                refusal = Some(r);
                break;
            }
        }
        if refusal.is_none() {
            slot.tokens.store(
                slot.tokens.load(Relaxed).saturating_add(more_tokens),
                Relaxed,
            );
            slot.money
                .store(slot.money.load(Relaxed).saturating_add(more_money), Relaxed);
        }
        let deadline = (now_ns / 1_000_000).saturating_add(ttl_ms);
        if deadline > slot.deadline_ms.load(Relaxed) {
            slot.deadline_ms.store(deadline, Relaxed);
        }
        slot.state.store(word, Release);
        Ok(refusal)
    }

    /// Records usage that no reservation covers (a settle that came after the expired
    /// reservation's slot was reused, or post-paid usage): added to used, and all of it to
    /// overrun; rate limits are charged without a check.
    pub fn charge(&self, accounts: &[u32], amounts: Amounts, now_ns: u64) -> Result<()> {
        self.check_accounts(accounts)?;
        let table = self.accounts();
        for &index in accounts {
            let s = &table[index as usize];
            budget_charge(&s.budgets[0], amounts.tokens);
            budget_charge(&s.budgets[1], amounts.money);
            budget_charge(&s.budgets[2], amounts.requests);
            gcra_add(&s.tpm, amounts.tokens, now_ns);
            gcra_add(&s.rpm, amounts.requests, now_ns);
        }
        Ok(())
    }

    /// Expires every held reservation whose deadline is at or before `now_ns`: releases its
    /// holds and concurrency slot (rate-limit charges stay). Returns how many expired.
    pub fn expire_due(&self, now_ns: u64) -> usize {
        let now_ms = now_ns / 1_000_000;
        let table = self.accounts();
        let mut expired = 0;
        for slot in self.slots() {
            let word = slot.state.load(Relaxed);
            if st(word) != RES_HELD || slot.deadline_ms.load(Relaxed) > now_ms {
                continue;
            }
            if slot
                .state
                .compare_exchange(word, with_state(word, RES_BUSY), Acquire, Relaxed)
                .is_err()
            {
                continue;
            }
            // An extend may have moved the deadline between the two loads and the CAS (it
            // returns the slot to the same word).
            if slot.deadline_ms.load(Relaxed) > now_ms {
                slot.state.store(word, Release);
                continue;
            }
            let (held, accounts, n) = Self::read_slot(slot);
            for &index in accounts[..n].iter().rev() {
                let s = &table[index as usize];
                budget_release(&s.budgets[0], held.tokens);
                budget_release(&s.budgets[1], held.money);
                budget_release(&s.budgets[2], held.requests);
                if held.concurrent {
                    conc_release(s);
                }
            }
            slot.expired.store(slot.expired.load(Relaxed) + 1, Relaxed);
            slot.state.store(with_state(word, RES_EXPIRED), Release);
            expired += 1;
        }
        expired
    }

    /// The state of a reservation: "held", "settled", ... or an error for an unknown id.
    pub fn reservation_state(&self, id: u64) -> Result<&'static str> {
        let (slot, gen) = self.decode_id(id)?;
        let word = slot.state.load(Acquire);
        if (word >> 8) & ID_GEN_MASK != gen || st(word) == RES_FREE {
            return Err(QuotaError::UnknownReservation(id));
        }
        Ok(state_name(st(word)))
    }

    // -- reading ---------------------------------------------------------------------------

    /// The `x-ratelimit-*` figures of an account: (requests per minute, tokens per minute).
    pub fn rate_status(&self, index: u32, now_ns: u64) -> Result<(RateStatus, RateStatus)> {
        let s = self.slot(index)?;
        Ok((gcra_status(&s.rpm, now_ns), gcra_status(&s.tpm, now_ns)))
    }

    /// What a budget can still take (`limit - held - used`, 0 when over); `UNLIMITED` for an
    /// unlimited one. One load per word: the cheap question admission planning asks.
    pub fn available(&self, index: u32, limit: Limit) -> Result<u64> {
        let cell = self.budget(index, limit)?;
        let cap = cell.limit.load(Relaxed);
        if cap == UNLIMITED {
            return Ok(UNLIMITED);
        }
        Ok(cap.saturating_sub(cell.charged.load(Relaxed)))
    }

    pub fn snapshot(&self, index: u32, now_ns: u64) -> Result<AccountSnapshot> {
        let s = self.slot(index)?;
        let budget = |c: &BudgetCell| {
            let used = c.used.load(Relaxed);
            BudgetSnapshot {
                limit: c.limit.load(Relaxed),
                used,
                held: c.charged.load(Relaxed).saturating_sub(used),
                overrun: c.overrun.load(Relaxed),
            }
        };
        Ok(AccountSnapshot {
            index,
            name: shm::read_name(s),
            tokens: budget(&s.budgets[0]),
            money: budget(&s.budgets[1]),
            requests: budget(&s.budgets[2]),
            concurrent_limit: s.conc_limit.load(Relaxed),
            inflight: s.conc_inflight.load(Relaxed),
            rpm: gcra_status(&s.rpm, now_ns),
            tpm: gcra_status(&s.tpm, now_ns),
            admitted: s.admitted.load(Relaxed),
            refused: s.refused.load(Relaxed),
        })
    }

    /// One pass over every slot (O(capacity): for monitoring and tests, not per request).
    pub fn stats(&self) -> TableStats {
        let mut t = TableStats {
            account_capacity: self.account_capacity,
            reservation_capacity: self.reservation_capacity,
            accounts: self
                .map
                .header()
                .accounts_in_use
                .load(Relaxed)
                .min(self.account_capacity as u64) as u32,
            ..TableStats::default()
        };
        for slot in self.slots() {
            let word = slot.state.load(Acquire);
            match st(word) {
                RES_HELD => t.held += 1,
                RES_BUSY => t.busy += 1,
                _ => t.free += 1,
            }
            // A slot BUSY on its way to HELD has its generation already; the reservation it
            // is making counts as held.
            t.reserved += word >> 8;
            t.settled += slot.settled.load(Relaxed);
            t.cancelled += slot.cancelled.load(Relaxed);
            t.expired += slot.expired.load(Relaxed);
            t.late += slot.late.load(Relaxed);
        }
        t
    }
}

#[cfg(test)]
mod tests;
