//! Routing: which deployment of a public model serves a request, in what order to retry, and
//! (in [`tier`]) whether a request needs the strong model at all.
//!
//! # The router
//!
//! A [`Router`] serves one public model. It holds its deployments' static description
//! ([`DeploymentSpec`]: weight, priority, prices, capacity) and their live state: the SWRR
//! current weight, requests outstanding, latency and TTFT EWMAs, rate-limit buckets, a circuit
//! breaker, and an affinity table shared by all of them. It never reads a clock: every call takes
//! `now_ms`, so a simulator can run it on a virtual clock and a gateway on a monotonic one, and
//! with the same seed and the same calls it makes the same decisions.
//!
//! [`Router::choose`] returns a [`Decision`]: the ordered attempt list (first choice, then the
//! fallbacks a request that fails before any byte reached the client is retried on; at most
//! `max_attempts`, never the same deployment twice) and a [`Reason`]. The caller reports what
//! happened with [`Router::on_start`], then [`Router::on_success`] or [`Router::on_failure`]
//! (each ends the request: outstanding is decremented there, so there is no separate finish
//! call on the normal path), or [`Router::on_finish`] for a request that ended without a verdict
//! (client gone, cancelled).
//!
//! A deployment is *eligible* when its circuit is closed and it has spare capacity for this
//! request; the attempt list holds eligible deployments only. The order of precedence:
//! 1. Affinity: the request's key maps to an eligible deployment: it goes first.
//! 2. Probe: a deployment whose cooldown is over and that has no probe out gets this request
//!    first (the fallbacks behind it are healthy, so a failed probe costs the client a retry,
//!    not an error). Without this a low-weight deployment might wait long for its probe.
//! 3. Policy: the policy's choice among eligible deployments.
//! 4. Degraded: nothing is eligible. Rather than refuse, the list is every deployment ordered by
//!    when it becomes usable: closed ones (over capacity) first, then open ones by the end of
//!    their cooldown.
//!
//! The reason is `fallback` when the policy's choice had to route around something it would
//! have preferred (an open circuit or a full deployment of lower priority value for `priority`,
//! of lower price for `cheapest`, any positive-weight one for the others), or when the
//! request's affinity deployment is not eligible and the request moves.
//!
//! # Policies
//!
//! - `swrr`: nginx's smooth weighted round robin over the eligible deployments (weights 5/1/1
//!   give a a b a c a a). Exact: over any whole number of cycles each gets precisely its share.
//!   Ineligible deployments neither gain nor lose current weight, as in nginx. Fallbacks: by
//!   current weight, the order SWRR itself would continue in.
//! - `random`: weighted random; fallbacks drawn the same way without replacement.
//! - `p2c`: least outstanding requests with the power of two choices: two distinct eligible
//!   deployments drawn uniformly, the one with fewer requests outstanding wins (weights are not
//!   used). Fallbacks: the loser, then by outstanding.
//! - `latency`: the lowest `latency EWMA x (outstanding + 1)` (a deployment not yet measured
//!   scores 0, so it is tried first). One decision in [`EXPLORE_ONE_IN`] picks uniformly instead,
//!   so a deployment that was slow once is measured again rather than starved forever.
//! - `cheapest`: the lowest blended price `3 x input + output` per 1M tokens (the 3:1 blend of
//!   the usual public price comparisons; chat prompts outweigh replies), ties by priority then
//!   index. Capacity does the spreading: when the cheapest is full, the next cheapest serves.
//! - `priority`: the lowest priority value among eligible deployments, SWRR by weight among
//!   equals; fallbacks by priority then current weight.
//!
//! Weight 0 means standby: a weighted policy picks it first only when no eligible deployment has
//! a positive weight.
//!
//! # Health
//!
//! A circuit breaker per deployment: `failures_to_trip` consecutive failures open it for
//! `cooldown_ms`; when the cooldown is over it is half-open: [`Router::choose`] sends one probe
//! at a time (another one only if no verdict came within a cooldown). A success closes it (and
//! the next trip starts again from `cooldown_ms`); a failure re-opens it for twice the last
//! cooldown, at most `max_cooldown_ms`. Reports carry no request id, so while a probe is out any
//! report for that deployment is taken as the probe's; while the circuit is open and no probe is
//! out, reports of requests started before it opened are counted but do not move it.
//!
//! # Capacity
//!
//! `rpm` and `tpm` are GCRA buckets (as in `rust/quota`: one theoretical arrival time per limit,
//! here in µs, advanced by `cost x 60 s / limit` at [`Router::on_start`]; a request fits while
//! that keeps the TAT within 60 s of now). That is an exact token bucket of `limit` per minute
//! refilled continuously, in one word, where a fixed window would admit twice the limit across a
//! boundary and a sliding log needs memory per request. The tpm cost is the caller's token
//! estimate at start (the router is not told actual usage). A request larger than the whole tpm
//! bucket fits only an idle bucket, so it is not refused forever. `max_concurrency` caps
//! outstanding requests.
//!
//! # Affinity
//!
//! Requests of one conversation carry a key (a session id or a hash of the shared prompt
//! prefix); they stick to one deployment while it is eligible, so providers' prompt caches keep
//! working. The table is direct-mapped, `affinity_slots` entries (a power of two, default 4096)
//! of (key, deployment): a key's slot is a hash of it, a new key overwrites whatever was there,
//! and a lookup that finds another key is a miss. Memory is fixed; the cost of a collision is one
//! conversation losing its cache, and with 4096 slots and a few hundred live conversations per
//! model collisions are rare. There is no expiry: a stale entry points at a deployment that is
//! at worst as good as any other. A choice made by policy or fallback records the key; a probe
//! does not (the request may well be retried elsewhere).
//!
//! Performance notes:
//! - `choose` allocates nothing: the decision is a fixed array of [`MAX_ATTEMPTS`] `u16`
//!   indexes, and the scratch space for fallbacks lives in the router and is reused.
//! - Eligibility is computed once per call into a reused `Vec<bool>`; the fallback ordering is a
//!   sort of the eligible indexes (n log n on a handful of deployments: cheaper than a heap).
//! - The PRNG is splitmix64: one add and three multiply-xorshifts, seedable, no crate.
//! - Measured on the 2-core dev machine (examples/router_bench.rs, benches/bench_router.py):
//!   a decision costs 22-35 ns in Rust with 3 deployments and 110-250 ns with 16 (SWRR and
//!   priority are the dearest: the nginx loop takes a data-dependent branch per deployment);
//!   the on_start/on_success reports add ~5-10 ns. From Python `Router.choose` is 0.12 µs (3) to
//!   0.35 µs (16) through the wrapper, ~0.1 µs of it the call and the `Decision` object (bar:
//!   2 µs); the same SWRR in pure Python is 1.2 µs and 3.5 µs.
//! - No call releases the GIL: they are all far cheaper than handing it over (rust/quota
//!   measured that at 25-50% lost on two threads for ~150 ns calls).

pub mod error;
pub mod tier;

#[cfg(test)]
mod tests;

pub use error::{non_negative, Result, RouterError};
pub use tier::{Contract, Features, Tier, TierScorer, Weights};

use std::cmp::Ordering;

/// Most attempts one decision lists (and the largest accepted `max_attempts`).
pub const MAX_ATTEMPTS: usize = 8;
/// Most deployments one router holds (indexes are `u16`).
pub const MAX_DEPLOYMENTS: usize = 4096;
/// The affinity table's default size.
pub const DEFAULT_AFFINITY_SLOTS: usize = 4096;
/// The `latency` policy explores (picks uniformly) once in this many decisions.
pub const EXPLORE_ONE_IN: u64 = 32;
/// Rate limits are per minute; buckets run in µs.
const WINDOW_US: u64 = 60_000_000;
/// Weight of a new sample in the latency and TTFT EWMAs.
const EWMA_ALPHA: f64 = 0.25;

/// How a router picks among eligible deployments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    Swrr,
    Random,
    P2c,
    Latency,
    Cheapest,
    Priority,
}

impl Policy {
    pub const ALL: [Policy; 6] = [
        Policy::Swrr,
        Policy::Random,
        Policy::P2c,
        Policy::Latency,
        Policy::Cheapest,
        Policy::Priority,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Swrr => "swrr",
            Policy::Random => "random",
            Policy::P2c => "p2c",
            Policy::Latency => "latency",
            Policy::Cheapest => "cheapest",
            Policy::Priority => "priority",
        }
    }

    pub fn parse(name: &str) -> Result<Policy> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| RouterError::UnknownPolicy(name.to_owned()))
    }

    /// Policies that route by weight, and so need a positive total weight.
    pub fn weighted(self) -> bool {
        matches!(self, Policy::Swrr | Policy::Random | Policy::Priority)
    }
}

/// One deployment of the public model: a provider endpoint with its own price and limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeploymentSpec {
    pub name: String,
    /// Share of traffic under weighted policies (0: standby).
    pub weight: u32,
    /// Lower is preferred (`priority` policy, and tie-break for `cheapest`).
    pub priority: u32,
    /// Prices in integer nano-units per 1M tokens.
    pub input_per_1m: u64,
    pub cached_input_per_1m: u64,
    pub output_per_1m: u64,
    /// Requests per minute the deployment accepts (`None`: unlimited).
    pub rpm: Option<u64>,
    /// Tokens per minute (`None`: unlimited).
    pub tpm: Option<u64>,
    /// Requests in flight at once (`None`: unlimited).
    pub max_concurrency: Option<u32>,
}

/// A router's tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub policy: Policy,
    pub seed: u64,
    /// Length bound of the attempt list: first choice plus retries (1..=[`MAX_ATTEMPTS`]).
    pub max_attempts: usize,
    /// Consecutive failures that open a circuit (>= 1).
    pub failures_to_trip: u32,
    /// First cooldown of an opened circuit, ms (>= 1).
    pub cooldown_ms: u64,
    /// Cooldowns double on each failed probe up to this (>= `cooldown_ms`).
    pub max_cooldown_ms: u64,
    /// Affinity table size (a power of two, >= 1).
    pub affinity_slots: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::Swrr,
            seed: 0,
            max_attempts: 3,
            failures_to_trip: 3,
            cooldown_ms: 5_000,
            max_cooldown_ms: 60_000,
            affinity_slots: DEFAULT_AFFINITY_SLOTS,
        }
    }
}

/// Why the first choice of a decision is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The policy's own choice, nothing routed around.
    Policy,
    /// The request's affinity key's deployment.
    Affinity,
    /// The policy's choice after routing around an ineligible deployment it would have
    /// preferred, or moving an affinity key off an ineligible deployment.
    Fallback,
    /// A half-open deployment's probe.
    Probe,
    /// Nothing was eligible: the deployments that recover first.
    Degraded,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Policy => "policy",
            Reason::Affinity => "affinity",
            Reason::Fallback => "fallback",
            Reason::Probe => "probe",
            Reason::Degraded => "degraded",
        }
    }
}

/// The attempt list of one request: deployment indexes, first choice first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    order: [u16; MAX_ATTEMPTS],
    len: u8,
    pub reason: Reason,
}

impl Decision {
    fn new() -> Self {
        Decision {
            order: [0; MAX_ATTEMPTS],
            len: 0,
            reason: Reason::Policy,
        }
    }

    /// Never empty, never repeats an index.
    pub fn order(&self) -> &[u16] {
        &self.order[..self.len as usize]
    }

    pub fn first(&self) -> usize {
        self.order[0] as usize
    }

    fn push(&mut self, index: usize) {
        self.order[self.len as usize] = index as u16;
        self.len += 1;
    }

    fn contains(&self, index: usize) -> bool {
        self.order().contains(&(index as u16))
    }
}

/// A deployment's circuit as seen at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Circuit {
    Closed,
    /// Cooling down: no traffic.
    Open,
    /// Cooldown over: probes may go.
    HalfOpen,
}

impl Circuit {
    pub fn name(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

/// A snapshot of one deployment's live state (for dashboards, tests and the simulator).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeploymentState {
    pub outstanding: u32,
    /// ms; 0 before the first report.
    pub latency_ewma_ms: f64,
    pub ttft_ewma_ms: f64,
    pub circuit: Circuit,
    /// When the open circuit's cooldown ends (`None`: closed).
    pub cooldown_until: Option<u64>,
    /// The cooldown the circuit is serving (or would serve on its next trip).
    pub cooldown_ms: u64,
    pub consecutive_failures: u32,
    pub probing: bool,
    /// Requests and tokens charged to the rpm/tpm buckets that have not drained yet: the usage
    /// of the last minute as the bucket sees it (0 without a limit).
    pub rpm_used: u64,
    pub tpm_used: u64,
    /// Totals since the router was made.
    pub started: u64,
    pub successes: u64,
    pub failures: u64,
    pub current_weight: i64,
}

/// splitmix64: tiny, fast, and good enough for load balancing; deterministic from its seed.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (bias < n / 2^64).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of a session id or prompt prefix, as the Python layer uses for string affinity keys.
pub fn affinity_key(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// GCRA: would `cost` fit a bucket of `limit` per minute whose TAT is `tat` at `now` (µs)?
fn gcra_fits(tat: u64, now: u64, cost: u64, limit: u64) -> bool {
    tat <= now || tat.max(now) - now + gcra_increment(cost, limit) <= WINDOW_US
}

fn gcra_increment(cost: u64, limit: u64) -> u64 {
    (cost as u128 * WINDOW_US as u128 / limit as u128).min(u64::MAX as u128) as u64
}

/// What is still in the bucket from the last minute, in the limit's units (rounded up).
fn gcra_used(tat: u64, now: u64, limit: u64) -> u64 {
    let ahead = tat.saturating_sub(now) as u128;
    (ahead * limit as u128).div_ceil(WINDOW_US as u128) as u64
}

#[derive(Clone, Debug)]
struct Deployment {
    spec: DeploymentSpec,
    /// 3 x input + output, for `cheapest`.
    blended: u128,
    current: i64,
    outstanding: u32,
    latency_ewma: f64,
    ttft_ewma: f64,
    measured: bool,
    ttft_measured: bool,
    rpm_tat: u64,
    tpm_tat: u64,
    started: u64,
    successes: u64,
    failures: u64,
    consecutive: u32,
    open: bool,
    open_until: u64,
    cooldown: u64,
    probing: bool,
    probe_at: u64,
}

impl Deployment {
    fn circuit(&self, now: u64) -> Circuit {
        if !self.open {
            Circuit::Closed
        } else if now < self.open_until {
            Circuit::Open
        } else {
            Circuit::HalfOpen
        }
    }

    fn probe_ready(&self, now: u64) -> bool {
        self.open
            && now >= self.open_until
            && (!self.probing || now >= self.probe_at.saturating_add(self.cooldown))
    }

    fn has_room(&self, now_us: u64, tokens: u64) -> bool {
        if let Some(m) = self.spec.max_concurrency {
            if self.outstanding >= m {
                return false;
            }
        }
        if let Some(l) = self.spec.rpm {
            if !gcra_fits(self.rpm_tat, now_us, 1, l) {
                return false;
            }
        }
        if let Some(l) = self.spec.tpm {
            if !gcra_fits(self.tpm_tat, now_us, tokens, l) {
                return false;
            }
        }
        true
    }

    fn end(&mut self) {
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    /// `latency` policy score: lower is better.
    fn latency_score(&self) -> f64 {
        self.latency_ewma * (self.outstanding as f64 + 1.0)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct AffinitySlot {
    key: u64,
    /// Deployment index + 1; 0 = empty.
    target: u16,
}

/// The router of one public model (see the module docs).
#[derive(Clone, Debug)]
pub struct Router {
    deps: Vec<Deployment>,
    config: Config,
    rng: SplitMix64,
    affinity: Vec<AffinitySlot>,
    /// Per-call scratch, reused: eligibility and fallback candidates.
    ok: Vec<bool>,
    group: Vec<bool>,
    scratch: Vec<u16>,
    /// The latest `now_ms` seen, for snapshots taken without a time.
    last_now: u64,
}

impl Router {
    pub fn new(specs: Vec<DeploymentSpec>, config: Config) -> Result<Router> {
        if specs.is_empty() {
            return Err(RouterError::NoDeployments);
        }
        if specs.len() > MAX_DEPLOYMENTS {
            return Err(RouterError::TooManyDeployments {
                count: specs.len(),
                max: MAX_DEPLOYMENTS,
            });
        }
        if config.policy.weighted() && specs.iter().all(|s| s.weight == 0) {
            return Err(RouterError::ZeroTotalWeight {
                policy: config.policy.name(),
            });
        }
        let invalid = |m: String| Err(RouterError::Invalid(m));
        if !(1..=MAX_ATTEMPTS).contains(&config.max_attempts) {
            return invalid(format!(
                "max_attempts must be 1..={MAX_ATTEMPTS}, got {}",
                config.max_attempts
            ));
        }
        if config.failures_to_trip == 0 {
            return invalid("failures_to_trip must be >= 1".into());
        }
        if config.cooldown_ms == 0 || config.max_cooldown_ms < config.cooldown_ms {
            return invalid(format!(
                "need 1 <= cooldown_ms <= max_cooldown_ms, got {} and {}",
                config.cooldown_ms, config.max_cooldown_ms
            ));
        }
        if !config.affinity_slots.is_power_of_two() {
            return invalid(format!(
                "affinity_slots must be a power of two, got {}",
                config.affinity_slots
            ));
        }
        for s in &specs {
            let zero = (
                s.rpm == Some(0),
                s.tpm == Some(0),
                s.max_concurrency == Some(0),
            );
            if zero.0 || zero.1 || zero.2 {
                return invalid(format!(
                    "deployment {:?}: rpm, tpm and max_concurrency must be positive or unset \
                     (use weight 0 for a standby deployment)",
                    s.name
                ));
            }
        }
        let deps = specs
            .into_iter()
            .map(|spec| Deployment {
                blended: 3 * spec.input_per_1m as u128 + spec.output_per_1m as u128,
                spec,
                current: 0,
                outstanding: 0,
                latency_ewma: 0.0,
                ttft_ewma: 0.0,
                measured: false,
                ttft_measured: false,
                rpm_tat: 0,
                tpm_tat: 0,
                started: 0,
                successes: 0,
                failures: 0,
                consecutive: 0,
                open: false,
                open_until: 0,
                cooldown: config.cooldown_ms,
                probing: false,
                probe_at: 0,
            })
            .collect::<Vec<_>>();
        let n = deps.len();
        Ok(Router {
            deps,
            config,
            rng: SplitMix64(config.seed),
            affinity: vec![AffinitySlot::default(); config.affinity_slots],
            ok: Vec::with_capacity(n),
            group: Vec::with_capacity(n),
            scratch: Vec::with_capacity(n),
            last_now: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.deps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deps.is_empty()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn spec(&self, index: usize) -> Result<&DeploymentSpec> {
        Ok(&self.dep(index)?.spec)
    }

    pub fn specs(&self) -> impl ExactSizeIterator<Item = &DeploymentSpec> {
        self.deps.iter().map(|d| &d.spec)
    }

    fn dep(&self, index: usize) -> Result<&Deployment> {
        let len = self.deps.len();
        self.deps
            .get(index)
            .ok_or(RouterError::BadIndex { index, len })
    }

    fn dep_mut(&mut self, index: usize, now_ms: u64) -> Result<&mut Deployment> {
        self.last_now = self.last_now.max(now_ms);
        let len = self.deps.len();
        self.deps
            .get_mut(index)
            .ok_or(RouterError::BadIndex { index, len })
    }

    fn slot(&self, key: u64) -> usize {
        (mix64(key) as usize) & (self.affinity.len() - 1)
    }

    /// The deployment a key currently sticks to, if its slot still holds it.
    pub fn affinity_target(&self, key: u64) -> Option<usize> {
        let s = self.affinity[self.slot(key)];
        (s.target != 0 && s.key == key).then(|| s.target as usize - 1)
    }

    /// The attempt list for one request of `tokens` (estimated prompt + output, for tpm) at
    /// `now_ms`, with an optional affinity key.
    pub fn choose(&mut self, now_ms: u64, tokens: u64, affinity: Option<u64>) -> Decision {
        self.last_now = self.last_now.max(now_ms);
        let now_us = now_ms.saturating_mul(1000);
        let mut ok = std::mem::take(&mut self.ok);
        ok.clear();
        let mut any_ok = false;
        for d in &self.deps {
            let e = !d.open && d.has_room(now_us, tokens);
            any_ok |= e;
            ok.push(e);
        }
        let mut out = Decision::new();
        let mut moved = false;
        let slot = affinity.map(|k| (k, self.slot(k)));
        if let Some((key, s)) = slot {
            let entry = self.affinity[s];
            if entry.target != 0 && entry.key == key {
                let i = entry.target as usize - 1;
                if ok[i] {
                    out.push(i);
                    out.reason = Reason::Affinity;
                } else {
                    moved = true;
                }
            }
        }
        if out.len == 0 {
            if let Some(p) = self.probe_candidate(now_ms) {
                let d = &mut self.deps[p];
                d.probing = true;
                d.probe_at = now_ms;
                out.push(p);
                out.reason = Reason::Probe;
            }
        }
        if out.len == 0 && !any_ok {
            self.degraded(&mut out, now_ms);
            self.ok = ok;
            return out;
        }
        let mut loser = None;
        if out.len == 0 {
            let (first, second) = self.pick(&ok);
            loser = second;
            out.push(first);
            out.reason = if moved || self.skipped_preferred(&ok, first) {
                Reason::Fallback
            } else {
                Reason::Policy
            };
        }
        self.fallbacks(&ok, &mut out, loser);
        if let Some((key, s)) = slot {
            if matches!(out.reason, Reason::Policy | Reason::Fallback) {
                self.affinity[s] = AffinitySlot {
                    key,
                    target: out.order[0] + 1,
                };
            }
        }
        self.ok = ok;
        out
    }

    fn probe_candidate(&self, now: u64) -> Option<usize> {
        self.deps
            .iter()
            .enumerate()
            .filter(|(_, d)| d.probe_ready(now))
            .min_by_key(|(i, d)| (d.open_until, *i))
            .map(|(i, _)| i)
    }

    fn degraded(&mut self, out: &mut Decision, now: u64) {
        let mut idx = std::mem::take(&mut self.scratch);
        idx.clear();
        idx.extend(0..self.deps.len() as u16);
        let deps = &self.deps;
        // Closed (just full) first, then by the end of the cooldown; a probe already out is
        // not duplicated ahead of a deployment nobody is trying.
        idx.sort_unstable_by_key(|&i| {
            let d = &deps[i as usize];
            let usable_at = if d.open { d.open_until.max(now) } else { 0 };
            (d.open, usable_at, d.probing, d.spec.priority, i)
        });
        for &i in idx.iter().take(self.config.max_attempts) {
            out.push(i as usize);
        }
        out.reason = Reason::Degraded;
        self.scratch = idx;
    }

    /// nginx's smooth weighted round robin over `ok`; the zero-weight ones only when no
    /// positive weight is eligible (then the lowest index).
    fn swrr(&mut self, ok: &[bool]) -> usize {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        let mut best_current = i64::MIN;
        for (i, d) in self.deps.iter_mut().enumerate() {
            if !ok[i] || d.spec.weight == 0 {
                continue;
            }
            let w = d.spec.weight as i64;
            d.current += w;
            total += w;
            if best.is_none() || d.current > best_current {
                best = Some(i);
                best_current = d.current;
            }
        }
        match best {
            Some(i) => {
                self.deps[i].current -= total;
                i
            }
            None => first_true(ok),
        }
    }

    fn weighted_random(&mut self, ok: &[bool]) -> usize {
        let total: u64 = (0..ok.len())
            .filter(|&i| ok[i])
            .map(|i| self.deps[i].spec.weight as u64)
            .sum();
        if total == 0 {
            return self.uniform(ok);
        }
        let mut r = self.rng.below(total);
        for (i, d) in self.deps.iter().enumerate() {
            if !ok[i] {
                continue;
            }
            let w = d.spec.weight as u64;
            if r < w {
                return i;
            }
            r -= w;
        }
        first_true(ok)
    }

    fn uniform(&mut self, ok: &[bool]) -> usize {
        let n = ok.iter().filter(|&&e| e).count() as u64;
        let k = self.rng.below(n.max(1)) as usize;
        ok.iter()
            .enumerate()
            .filter(|(_, &e)| e)
            .nth(k)
            .map_or_else(|| first_true(ok), |(i, _)| i)
    }

    fn p2c(&mut self, ok: &[bool]) -> (usize, Option<usize>) {
        let n = ok.iter().filter(|&&e| e).count() as u64;
        if n < 2 {
            return (first_true(ok), None);
        }
        let a = self.rng.below(n);
        let mut b = self.rng.below(n - 1);
        if b >= a {
            b += 1;
        }
        let nth = |k: u64| {
            ok.iter()
                .enumerate()
                .filter(|(_, &e)| e)
                .nth(k as usize)
                .map_or(0, |(i, _)| i)
        };
        let (a, b) = (nth(a), nth(b));
        if self.deps[b].outstanding < self.deps[a].outstanding {
            (b, Some(a))
        } else {
            (a, Some(b))
        }
    }

    fn fastest(&mut self, ok: &[bool]) -> usize {
        if self.rng.below(EXPLORE_ONE_IN) == 0 {
            return self.uniform(ok);
        }
        let deps = &self.deps;
        (0..ok.len())
            .filter(|&i| ok[i])
            .min_by(|&a, &b| latency_order(&deps[a], &deps[b]).then(a.cmp(&b)))
            .unwrap_or(0)
    }

    fn cheapest(&self, ok: &[bool]) -> usize {
        let deps = &self.deps;
        (0..ok.len())
            .filter(|&i| ok[i])
            .min_by_key(|&i| (deps[i].blended, deps[i].spec.priority, i))
            .unwrap_or(0)
    }

    fn priority(&mut self, ok: &[bool]) -> usize {
        let deps = &self.deps;
        let top = (0..ok.len())
            .filter(|&i| ok[i])
            .map(|i| deps[i].spec.priority)
            .min()
            .unwrap_or(0);
        // Reuse the scratch bools: the group of eligible deployments at the top priority.
        let mut group = std::mem::take(&mut self.group);
        group.clear();
        group.extend((0..ok.len()).map(|i| ok[i] && deps[i].spec.priority == top));
        let i = self.swrr(&group);
        self.group = group;
        i
    }

    /// The policy's first choice among eligible deployments (at least one is), and for p2c the
    /// loser of the pair (the first fallback).
    fn pick(&mut self, ok: &[bool]) -> (usize, Option<usize>) {
        match self.config.policy {
            Policy::Swrr => (self.swrr(ok), None),
            Policy::Random => (self.weighted_random(ok), None),
            Policy::P2c => self.p2c(ok),
            Policy::Latency => (self.fastest(ok), None),
            Policy::Cheapest => (self.cheapest(ok), None),
            Policy::Priority => (self.priority(ok), None),
        }
    }

    /// Did the policy route around an ineligible deployment it would have preferred to `first`?
    fn skipped_preferred(&self, ok: &[bool], first: usize) -> bool {
        let f = &self.deps[first];
        self.deps.iter().zip(ok).any(|(d, &e)| {
            !e && match self.config.policy {
                Policy::Swrr | Policy::Random => d.spec.weight > 0,
                Policy::P2c | Policy::Latency => true,
                Policy::Cheapest => d.blended <= f.blended,
                Policy::Priority => d.spec.priority <= f.spec.priority,
            }
        })
    }

    /// Appends the fallbacks: eligible deployments not yet listed, in the policy's order.
    fn fallbacks(&mut self, ok: &[bool], out: &mut Decision, loser: Option<usize>) {
        let room = self.config.max_attempts;
        if let Some(l) = loser {
            if out.len < room as u8 && !out.contains(l) {
                out.push(l);
            }
        }
        if out.len as usize >= room {
            return;
        }
        let mut idx = std::mem::take(&mut self.scratch);
        idx.clear();
        idx.extend(
            (0..ok.len())
                .filter(|&i| ok[i] && !out.contains(i))
                .map(|i| i as u16),
        );
        let deps = &self.deps;
        let d = |i: u16| &deps[i as usize];
        let want = room - out.len as usize;
        match self.config.policy {
            Policy::Random => {
                // Weighted draws without replacement (zero weights last, uniformly).
                while (out.len as usize) < room && !idx.is_empty() {
                    let total: u64 = idx.iter().map(|&i| d(i).spec.weight as u64).sum();
                    let k = if total == 0 {
                        self.rng.below(idx.len() as u64) as usize
                    } else {
                        let mut r = self.rng.below(total);
                        idx.iter()
                            .position(|&i| {
                                let w = d(i).spec.weight as u64;
                                let hit = r < w;
                                r = r.saturating_sub(w);
                                hit
                            })
                            .unwrap_or(0)
                    };
                    out.push(idx.swap_remove(k) as usize);
                }
                self.scratch = idx;
                return;
            }
            Policy::Swrr => top_k(&mut idx, want, |&i| {
                (d(i).spec.weight == 0, -d(i).current, i)
            }),
            Policy::P2c => top_k(&mut idx, want, |&i| (d(i).outstanding, i)),
            Policy::Latency => top_k_by(&mut idx, want, |&a, &b| {
                latency_order(d(a), d(b)).then(a.cmp(&b))
            }),
            Policy::Cheapest => top_k(&mut idx, want, |&i| (d(i).blended, d(i).spec.priority, i)),
            Policy::Priority => top_k(&mut idx, want, |&i| {
                (d(i).spec.priority, d(i).spec.weight == 0, -d(i).current, i)
            }),
        }
        for &i in &idx {
            if out.len as usize >= room {
                break;
            }
            out.push(i as usize);
        }
        self.scratch = idx;
    }

    /// A request goes to deployment `index`: it counts as outstanding and is charged to the
    /// rpm (1) and tpm (`tokens`) buckets.
    pub fn on_start(&mut self, index: usize, now_ms: u64, tokens: u64) -> Result<()> {
        let d = self.dep_mut(index, now_ms)?;
        let now_us = now_ms.saturating_mul(1000);
        d.outstanding = d.outstanding.saturating_add(1);
        d.started += 1;
        if let Some(l) = d.spec.rpm {
            d.rpm_tat = d.rpm_tat.max(now_us).saturating_add(gcra_increment(1, l));
        }
        if let Some(l) = d.spec.tpm {
            d.tpm_tat = d
                .tpm_tat
                .max(now_us)
                .saturating_add(gcra_increment(tokens, l));
        }
        Ok(())
    }

    /// The request on `index` succeeded (and ended): latency and TTFT feed the EWMAs (a TTFT of
    /// 0 means "not measured", e.g. not streamed); a probe's success closes the circuit.
    pub fn on_success(
        &mut self,
        index: usize,
        now_ms: u64,
        latency_ms: f64,
        ttft_ms: f64,
    ) -> Result<()> {
        for (what, v) in [("latency_ms", latency_ms), ("ttft_ms", ttft_ms)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(RouterError::Invalid(format!(
                    "{what} must be a finite number >= 0, got {v}"
                )));
            }
        }
        let base = self.config.cooldown_ms;
        let d = self.dep_mut(index, now_ms)?;
        d.end();
        d.successes += 1;
        d.consecutive = 0;
        ewma(&mut d.latency_ewma, &mut d.measured, latency_ms);
        if ttft_ms > 0.0 {
            ewma(&mut d.ttft_ewma, &mut d.ttft_measured, ttft_ms);
        }
        if d.open && d.probing {
            d.open = false;
            d.probing = false;
            d.cooldown = base;
        }
        Ok(())
    }

    /// The request on `index` failed (and ended). Consecutive failures open the circuit; a
    /// probe's failure re-opens it for twice the last cooldown (capped).
    pub fn on_failure(&mut self, index: usize, now_ms: u64) -> Result<()> {
        let (base, max, trip) = (
            self.config.cooldown_ms,
            self.config.max_cooldown_ms,
            self.config.failures_to_trip,
        );
        let d = self.dep_mut(index, now_ms)?;
        d.end();
        d.failures += 1;
        d.consecutive = d.consecutive.saturating_add(1);
        if d.open {
            if d.probing {
                d.probing = false;
                d.cooldown = d.cooldown.saturating_mul(2).min(max);
                d.open_until = now_ms.saturating_add(d.cooldown);
            }
        } else if d.consecutive >= trip {
            d.open = true;
            d.probing = false;
            d.cooldown = base;
            d.open_until = now_ms.saturating_add(base);
        }
        Ok(())
    }

    /// The request on `index` ended without a verdict (cancelled, client gone): no longer
    /// outstanding, and if it was the probe another one may go.
    pub fn on_finish(&mut self, index: usize) -> Result<()> {
        let d = self.dep_mut(index, 0)?;
        d.end();
        d.probing = false;
        Ok(())
    }

    /// Deployment `index` as seen at `now_ms` (`None`: the latest time any call passed).
    pub fn state(&self, index: usize, now_ms: Option<u64>) -> Result<DeploymentState> {
        let d = self.dep(index)?;
        let now = now_ms.unwrap_or(self.last_now);
        let now_us = now.saturating_mul(1000);
        Ok(DeploymentState {
            outstanding: d.outstanding,
            latency_ewma_ms: d.latency_ewma,
            ttft_ewma_ms: d.ttft_ewma,
            circuit: d.circuit(now),
            cooldown_until: d.open.then_some(d.open_until),
            cooldown_ms: d.cooldown,
            consecutive_failures: d.consecutive,
            probing: d.probing,
            rpm_used: d.spec.rpm.map_or(0, |l| gcra_used(d.rpm_tat, now_us, l)),
            tpm_used: d.spec.tpm.map_or(0, |l| gcra_used(d.tpm_tat, now_us, l)),
            started: d.started,
            successes: d.successes,
            failures: d.failures,
            current_weight: d.current,
        })
    }
}

fn ewma(value: &mut f64, measured: &mut bool, sample: f64) {
    if *measured {
        *value += EWMA_ALPHA * (sample - *value);
    } else {
        *value = sample;
        *measured = true;
    }
}

fn latency_order(a: &Deployment, b: &Deployment) -> Ordering {
    a.latency_score()
        .total_cmp(&b.latency_score())
        .then(a.outstanding.cmp(&b.outstanding))
}

/// Puts the `k` smallest of `v` (by `key`) first, in order; the rest stay after them unordered.
/// Only the fallbacks that fit the attempt list need an order: a selection, then a sort of `k`.
fn top_k<K: Ord>(v: &mut [u16], k: usize, key: impl Fn(&u16) -> K) {
    top_k_by(v, k, |a, b| key(a).cmp(&key(b)));
}

fn top_k_by(v: &mut [u16], k: usize, cmp: impl Fn(&u16, &u16) -> Ordering) {
    if k == 0 || v.is_empty() {
        return;
    }
    if k < v.len() {
        v.select_nth_unstable_by(k - 1, &cmp);
    }
    let k = k.min(v.len());
    v[..k].sort_unstable_by(cmp);
}

fn first_true(ok: &[bool]) -> usize {
    ok.iter().position(|&e| e).unwrap_or(0)
}
