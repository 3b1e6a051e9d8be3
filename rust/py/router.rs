//! PyO3 wrappers of the router and the tier scorer (see `rust/router`), and the one place where
//! `RouterError` becomes a Python exception.
//!
//! Every call here is sub-microsecond work on the router's own state, so none releases the GIL
//! (handing it over would cost more than the call). `choose` takes small ints and an optional
//! int or str key and returns a `Decision` that holds the plain Rust decision: its `order` tuple
//! and `reason` string are built when read, so a caller that only needs `first` pays for no
//! tuple.

use crate::router::{
    self, non_negative, Config, Contract, DeploymentSpec, Features, Policy, Reason, Router,
    RouterError, TierScorer, Weights,
};
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyString, PyTuple};
use std::collections::HashMap;

fn router_err(e: RouterError) -> PyErr {
    match e {
        RouterError::BadIndex { .. } => PyIndexError::new_err(e.to_string()),
        RouterError::UnknownPolicy(_)
        | RouterError::NoDeployments
        | RouterError::TooManyDeployments { .. }
        | RouterError::ZeroTotalWeight { .. }
        | RouterError::Invalid(_) => PyValueError::new_err(e.to_string()),
    }
}

/// A deployment as the Python layer passes it: (name, weight, priority, input_per_1m,
/// cached_input_per_1m, output_per_1m, rpm, tpm, max_concurrency), ints signed so that a
/// negative one is reported as such rather than as an overflow.
type SpecTuple = (
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn spec_from(t: SpecTuple) -> Result<DeploymentSpec, RouterError> {
    let (name, weight, priority, input, cached, output, rpm, tpm, conc) = t;
    let field = |what: &str, v: i64| non_negative(&format!("deployment {name:?}: {what}"), v);
    let small = |what: &str, v: i64| -> Result<u32, RouterError> {
        let v = field(what, v)?;
        u32::try_from(v).map_err(|_| {
            RouterError::Invalid(format!(
                "deployment {name:?}: {what} must be < 2**32, got {v}"
            ))
        })
    };
    Ok(DeploymentSpec {
        weight: small("weight", weight)?,
        priority: small("priority", priority)?,
        input_per_1m: field("input_per_1m", input)?,
        cached_input_per_1m: field("cached_input_per_1m", cached)?,
        output_per_1m: field("output_per_1m", output)?,
        rpm: rpm.map(|v| field("rpm", v)).transpose()?,
        tpm: tpm.map(|v| field("tpm", v)).transpose()?,
        max_concurrency: conc.map(|v| small("max_concurrency", v)).transpose()?,
        name,
    })
}

/// An affinity key from Python: an int (any sign, taken modulo 2**64) or a str (hashed).
fn affinity_arg(key: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    let Some(key) = key else { return Ok(None) };
    if key.is_none() {
        return Ok(None);
    }
    if let Ok(s) = key.cast::<PyString>() {
        return Ok(Some(router::affinity_key(s.to_str()?)));
    }
    if key.is_instance_of::<PyInt>() {
        if let Ok(v) = key.extract::<u64>() {
            return Ok(Some(v));
        }
        if let Ok(v) = key.extract::<i64>() {
            return Ok(Some(v as u64));
        }
        return Err(PyValueError::new_err(
            "an int affinity key must fit in 64 bits (hash it, or pass a str)",
        ));
    }
    Err(PyValueError::new_err(format!(
        "affinity must be an int, a str or None, not {}",
        key.get_type().name()?
    )))
}

fn reason_str(py: Python<'_>, r: Reason) -> Bound<'_, PyString> {
    let s = match r {
        Reason::Policy => intern!(py, "policy"),
        Reason::Affinity => intern!(py, "affinity"),
        Reason::Fallback => intern!(py, "fallback"),
        Reason::Probe => intern!(py, "probe"),
        Reason::Degraded => intern!(py, "degraded"),
    };
    s.clone()
}

/// One routing decision: the attempt order and why its first choice is what it is.
#[pyclass(module = "tokenhub._core", name = "Decision", frozen)]
struct PyDecision {
    inner: router::Decision,
}

#[pymethods]
impl PyDecision {
    /// Deployment indexes to try, first choice first (never empty, no repeats).
    #[getter]
    fn order<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.order())
    }

    /// The first choice.
    #[getter]
    fn first(&self) -> usize {
        self.inner.first()
    }

    /// policy, affinity, fallback, probe or degraded.
    #[getter]
    fn reason<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        reason_str(py, self.inner.reason)
    }

    fn __len__(&self) -> usize {
        self.inner.order().len()
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyDecision>()
            .is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __repr__(&self) -> String {
        let order = self.inner.order();
        let items: Vec<String> = order.iter().map(u16::to_string).collect();
        let comma = if order.len() == 1 { "," } else { "" };
        format!(
            "Decision(order=({}{comma}), reason='{}')",
            items.join(", "),
            self.inner.reason.name()
        )
    }
}

/// The router of one public model (see `rust/router`).
#[pyclass(module = "tokenhub._core", name = "Router")]
struct PyRouter {
    inner: Router,
}

#[pymethods]
impl PyRouter {
    #[new]
    #[pyo3(signature = (deployments, policy="swrr", seed=0, max_attempts=3, failures_to_trip=3, cooldown_ms=5_000, max_cooldown_ms=60_000, affinity_slots=4096))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        deployments: Vec<SpecTuple>,
        policy: &str,
        seed: u64,
        max_attempts: i64,
        failures_to_trip: i64,
        cooldown_ms: i64,
        max_cooldown_ms: i64,
        affinity_slots: i64,
    ) -> PyResult<Self> {
        let build = || -> Result<Router, RouterError> {
            let specs = deployments
                .into_iter()
                .map(spec_from)
                .collect::<Result<Vec<_>, _>>()?;
            let count = |what: &str, v: i64| non_negative(what, v);
            let config = Config {
                policy: Policy::parse(policy)?,
                seed,
                max_attempts: count("max_attempts", max_attempts)? as usize,
                failures_to_trip: count("failures_to_trip", failures_to_trip)?.min(u32::MAX as u64)
                    as u32,
                cooldown_ms: count("cooldown_ms", cooldown_ms)?,
                max_cooldown_ms: count("max_cooldown_ms", max_cooldown_ms)?,
                affinity_slots: count("affinity_slots", affinity_slots)? as usize,
            };
            Router::new(specs, config)
        };
        Ok(PyRouter {
            inner: build().map_err(router_err)?,
        })
    }

    /// The attempt list for one request (see `rust/router`).
    #[pyo3(signature = (now_ms, tokens=0, affinity=None))]
    fn choose(
        &mut self,
        now_ms: u64,
        tokens: u64,
        affinity: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDecision> {
        let key = affinity_arg(affinity)?;
        Ok(PyDecision {
            inner: self.inner.choose(now_ms, tokens, key),
        })
    }

    /// A request goes to deployment `index` (outstanding + 1; charged to rpm and tpm).
    #[pyo3(signature = (index, now_ms, tokens=0))]
    fn on_start(&mut self, index: usize, now_ms: u64, tokens: u64) -> PyResult<()> {
        self.inner
            .on_start(index, now_ms, tokens)
            .map_err(router_err)
    }

    /// The request succeeded and ended (a ttft_ms of 0: not measured).
    #[pyo3(signature = (index, now_ms, latency_ms=0.0, ttft_ms=0.0))]
    fn on_success(
        &mut self,
        index: usize,
        now_ms: u64,
        latency_ms: f64,
        ttft_ms: f64,
    ) -> PyResult<()> {
        self.inner
            .on_success(index, now_ms, latency_ms, ttft_ms)
            .map_err(router_err)
    }

    /// The request failed and ended.
    fn on_failure(&mut self, index: usize, now_ms: u64) -> PyResult<()> {
        self.inner.on_failure(index, now_ms).map_err(router_err)
    }

    /// The request ended without a verdict (cancelled): outstanding - 1, any probe released.
    fn on_finish(&mut self, index: usize) -> PyResult<()> {
        self.inner.on_finish(index).map_err(router_err)
    }

    /// The deployment a key sticks to, if its affinity slot still holds it.
    fn affinity_target(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        Ok(affinity_arg(Some(key))?.and_then(|k| self.inner.affinity_target(k)))
    }

    #[getter]
    fn names<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.specs().map(|s| s.name.as_str()))
    }

    #[getter]
    fn policy(&self) -> &'static str {
        self.inner.config().policy.name()
    }

    #[getter]
    fn max_attempts(&self) -> usize {
        self.inner.config().max_attempts
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// One deployment's live state at `now_ms` (default: the latest time any call passed).
    #[pyo3(signature = (index, now_ms=None))]
    fn state<'py>(
        &self,
        py: Python<'py>,
        index: usize,
        now_ms: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.state(index, now_ms).map_err(router_err)?;
        let d = PyDict::new(py);
        d.set_item("outstanding", s.outstanding)?;
        d.set_item("latency_ewma_ms", s.latency_ewma_ms)?;
        d.set_item("ttft_ewma_ms", s.ttft_ewma_ms)?;
        d.set_item("circuit", s.circuit.name())?;
        d.set_item("cooldown_until", s.cooldown_until)?;
        d.set_item("cooldown_ms", s.cooldown_ms)?;
        d.set_item("consecutive_failures", s.consecutive_failures)?;
        d.set_item("probing", s.probing)?;
        d.set_item("rpm_used", s.rpm_used)?;
        d.set_item("tpm_used", s.tpm_used)?;
        d.set_item("started", s.started)?;
        d.set_item("successes", s.successes)?;
        d.set_item("failures", s.failures)?;
        d.set_item("current_weight", s.current_weight)?;
        Ok(d)
    }
}

/// What the tier scorer read from one request.
#[pyclass(module = "tokenhub._core", name = "Features", frozen, eq)]
#[derive(PartialEq)]
struct PyFeatures {
    inner: Features,
}

#[pymethods]
impl PyFeatures {
    #[getter]
    fn prompt_tokens(&self) -> u32 {
        self.inner.prompt_tokens
    }
    #[getter]
    fn words(&self) -> u32 {
        self.inner.words
    }
    #[getter]
    fn commas(&self) -> u32 {
        self.inner.commas
    }
    #[getter]
    fn depth(&self) -> u32 {
        self.inner.depth
    }
    #[getter]
    fn tools(&self) -> bool {
        self.inner.tools
    }
    #[getter]
    fn code_markers(&self) -> u32 {
        self.inner.code_markers
    }
    #[getter]
    fn symbols(&self) -> u32 {
        self.inner.symbols
    }
    #[getter]
    fn math_markers(&self) -> u32 {
        self.inner.math_markers
    }
    #[getter]
    fn keyword_hits(&self) -> u32 {
        self.inner.keyword_hits
    }
    #[getter]
    fn bytes(&self) -> u32 {
        self.inner.bytes
    }

    fn __repr__(&self) -> String {
        let f = &self.inner;
        format!(
            "Features(prompt_tokens={}, words={}, commas={}, depth={}, tools={}, \
             code_markers={}, symbols={}, math_markers={}, keyword_hits={}, bytes={})",
            f.prompt_tokens,
            f.words,
            f.commas,
            f.depth,
            if f.tools { "True" } else { "False" },
            f.code_markers,
            f.symbols,
            f.math_markers,
            f.keyword_hits,
            f.bytes
        )
    }
}

const _: () = assert!(
    router::tier::DEFAULT_THRESHOLD == 0.48,
    "update TierScorer's signature"
);

/// Cheap/strong tier assignment by a complexity score (see `rust/router/tier.rs`).
#[pyclass(module = "tokenhub._core", name = "TierScorer")]
struct PyTierScorer {
    inner: TierScorer,
}

#[pymethods]
impl PyTierScorer {
    #[new]
    // The default is a literal so that Python's signature (and stubtest) shows it.
    #[pyo3(signature = (threshold=0.48, keywords=Vec::new(), weights=None))]
    fn new(
        threshold: f64,
        keywords: Vec<String>,
        weights: Option<HashMap<String, f64>>,
    ) -> PyResult<Self> {
        let build = || -> Result<TierScorer, RouterError> {
            let mut w = Weights::default();
            for (name, value) in weights.into_iter().flatten() {
                w.set(&name, value)?;
            }
            TierScorer::new(threshold, w, keywords)
        };
        Ok(PyTierScorer {
            inner: build().map_err(router_err)?,
        })
    }

    #[pyo3(signature = (text, depth=0, tools=false, prompt_tokens=0))]
    fn features(&self, text: &str, depth: u32, tools: bool, prompt_tokens: u32) -> PyFeatures {
        PyFeatures {
            inner: self.inner.features(text, depth, tools, prompt_tokens),
        }
    }

    fn score(&self, features: PyRef<'_, PyFeatures>) -> f64 {
        self.inner.score(&features.inner)
    }

    #[pyo3(signature = (text, depth=0, tools=false, prompt_tokens=0))]
    fn score_text(&self, text: &str, depth: u32, tools: bool, prompt_tokens: u32) -> f64 {
        self.inner.score_text(text, depth, tools, prompt_tokens)
    }

    /// cheap or strong; a capped contract counts the decision against `holder`'s share.
    #[pyo3(signature = (score, allow_strong=true, max_strong_share=None, holder=None))]
    fn tier(
        &mut self,
        score: f64,
        allow_strong: bool,
        max_strong_share: Option<f64>,
        holder: Option<&str>,
    ) -> PyResult<&'static str> {
        let contract = Contract {
            allow_strong,
            max_strong_share,
        };
        let t = self
            .inner
            .tier(score, contract, router::tier::holder_key(holder))
            .map_err(router_err)?;
        Ok(t.name())
    }

    /// (strong, total) capped decisions counted for `holder`.
    #[pyo3(signature = (holder=None))]
    fn share(&self, holder: Option<&str>) -> (u64, u64) {
        self.inner.share(router::tier::holder_key(holder))
    }

    #[getter]
    fn threshold(&self) -> f64 {
        self.inner.threshold()
    }

    #[getter]
    fn keywords<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.inner.keywords())
    }

    #[getter]
    fn weights(&self) -> HashMap<&'static str, f64> {
        Weights::NAMES
            .into_iter()
            .zip(self.inner.weights().values())
            .collect()
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRouter>()?;
    m.add_class::<PyDecision>()?;
    m.add_class::<PyTierScorer>()?;
    m.add_class::<PyFeatures>()?;
    m.add(
        "POLICIES",
        PyTuple::new(m.py(), Policy::ALL.map(Policy::name))?,
    )?;
    Ok(())
}
