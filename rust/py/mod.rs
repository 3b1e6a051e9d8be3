//! PyO3 glue: thin wrappers over the plain-Rust core, and the one place where core errors
//! become Python exceptions.
//!
//! Inputs are borrowed (`&str`, `PyBackedStr`) rather than copied, and any call whose cost grows
//! with its input releases the GIL (`Python::detach`).

use crate::meter::{Meter, MeterError, StreamState};
use crate::quota::{
    self, Actual, Amounts, Limit, QuotaError as CoreQuotaError, QuotaTable, Refusal,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyTuple};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

mod relay;
mod router;

create_exception!(
    _core,
    VocabError,
    PyValueError,
    "A vocabulary is missing, unreadable or malformed (the message names the file and line)."
);

create_exception!(
    _core,
    QuotaError,
    PyRuntimeError,
    "A quota table operation failed (the subclasses say how)."
);
create_exception!(
    _core,
    QuotaFileError,
    QuotaError,
    "The quota table file cannot be created or opened, or is not a table this build can use."
);
create_exception!(
    _core,
    QuotaFullError,
    QuotaError,
    "Every account slot, or every reservation slot, of the quota table is taken."
);
create_exception!(
    _core,
    ReservationError,
    QuotaError,
    "The reservation id is unknown (or its slot was reused), or the reservation already ended."
);

/// Below this many bytes a count keeps the GIL: releasing and retaking it costs more.
const DETACH_BYTES: usize = 8 * 1024;

fn to_py(e: MeterError) -> PyErr {
    match e {
        MeterError::Io { .. } | MeterError::Corrupt { .. } | MeterError::Pattern { .. } => {
            VocabError::new_err(e.to_string())
        }
        MeterError::UnknownId(_) => PyValueError::new_err(e.to_string()),
        MeterError::Tokenizer(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

fn quota_err(e: CoreQuotaError) -> PyErr {
    let msg = e.to_string();
    match e {
        CoreQuotaError::Io { .. } | CoreQuotaError::BadTable { .. } => QuotaFileError::new_err(msg),
        CoreQuotaError::AccountsFull { .. } | CoreQuotaError::ReservationsFull { .. } => {
            QuotaFullError::new_err(msg)
        }
        CoreQuotaError::Invalid(_) => PyValueError::new_err(msg),
        CoreQuotaError::UnknownReservation(_) | CoreQuotaError::Finished { .. } => {
            ReservationError::new_err(msg)
        }
        CoreQuotaError::Stuck { .. } => QuotaError::new_err(msg),
    }
}

fn path_str(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The compiled meter behind `tokenhub.Meter`.
#[pyclass(module = "tokenhub._core", name = "CoreMeter", frozen)]
struct PyMeter {
    inner: Arc<Meter>,
}

#[pymethods]
impl PyMeter {
    #[staticmethod]
    #[pyo3(signature = (path, pattern, special_tokens=None, nfc=false))]
    fn from_tiktoken(
        py: Python<'_>,
        path: PathBuf,
        pattern: &str,
        special_tokens: Option<HashMap<String, u32>>,
        nfc: bool,
    ) -> PyResult<Self> {
        let specials: Vec<(String, u32)> = special_tokens.unwrap_or_default().into_iter().collect();
        let path = path_str(&path);
        let meter = py
            .detach(|| Meter::from_tiktoken_file(&path, pattern, &specials, nfc))
            .map_err(to_py)?;
        Ok(PyMeter {
            inner: Arc::new(meter),
        })
    }

    #[staticmethod]
    #[pyo3(signature = (path, force_fallback=false))]
    fn from_tokenizer_json(py: Python<'_>, path: PathBuf, force_fallback: bool) -> PyResult<Self> {
        let path = path_str(&path);
        let meter = py
            .detach(|| Meter::from_tokenizer_json_file(&path, force_fallback))
            .map_err(to_py)?;
        Ok(PyMeter {
            inner: Arc::new(meter),
        })
    }

    fn count(&self, py: Python<'_>, text: &str) -> usize {
        if text.len() < DETACH_BYTES {
            self.inner.count(text)
        } else {
            py.detach(|| self.inner.count(text))
        }
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.encode(text)).map_err(to_py)
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.inner.decode_bytes(&ids).map_err(to_py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn count_batch(&self, py: Python<'_>, texts: Vec<PyBackedStr>) -> Vec<usize> {
        py.detach(|| self.inner.count_batch(&texts))
    }

    fn count_cached_many(&self, py: Python<'_>, texts: Vec<PyBackedStr>) -> Vec<usize> {
        let total: usize = texts.iter().map(|t| t.len()).sum();
        let run = || texts.iter().map(|t| self.inner.count_cached(t)).collect();
        if total < DETACH_BYTES {
            run()
        } else {
            py.detach(run)
        }
    }

    fn stream(&self) -> PyStreamCounter {
        PyStreamCounter {
            meter: Arc::clone(&self.inner),
            state: self.inner.stream(),
        }
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn fallback_reason(&self) -> Option<String> {
        self.inner.fallback_reason().map(str::to_owned)
    }

    #[getter]
    fn cache_len(&self) -> usize {
        self.inner.cache_len()
    }
}

/// Running token count over streamed text deltas.
#[pyclass(module = "tokenhub._core", name = "StreamCounter")]
struct PyStreamCounter {
    meter: Arc<Meter>,
    state: StreamState,
}

#[pymethods]
impl PyStreamCounter {
    /// Appends a delta and returns the running total.
    fn feed(&mut self, delta: &str) -> usize {
        self.state.feed(&self.meter, delta)
    }

    /// Tokens in everything fed so far.
    #[getter]
    fn total(&self) -> usize {
        self.state.total(&self.meter)
    }
}

/// ns -> ms, rounded up (a client told to wait 0 ms retries too early).
fn ceil_ms(ns: u64) -> u64 {
    ns.div_ceil(1_000_000)
}

/// Why a reservation or extension was not admitted (see `rust/quota`).
#[pyclass(module = "tokenhub._core", name = "QuotaRefusal", frozen)]
struct PyQuotaRefusal {
    inner: Refusal,
}

#[pymethods]
impl PyQuotaRefusal {
    /// Index of the account that refused.
    #[getter]
    fn account(&self) -> u32 {
        self.inner.account
    }

    /// tokens, money, requests, concurrent, rpm or tpm.
    #[getter]
    fn limit(&self) -> &'static str {
        self.inner.limit.name()
    }

    /// OpenAI's error code: insufficient_quota (a budget) or rate_limit_exceeded.
    #[getter]
    fn code(&self) -> &'static str {
        self.inner.limit.code()
    }

    #[getter]
    fn limit_value(&self) -> u64 {
        self.inner.limit_value
    }

    #[getter]
    fn remaining(&self) -> u64 {
        self.inner.remaining
    }

    /// Rate limits: ms until this request would fit (None: never, or not a rate limit).
    #[getter]
    fn retry_after_ms(&self) -> Option<u64> {
        self.inner.retry_after_ns.map(ceil_ms)
    }

    /// Rate limits: ms until the limit is full again (None: not a rate limit).
    #[getter]
    fn reset_ms(&self) -> Option<u64> {
        self.inner.reset_ns.map(ceil_ms)
    }

    fn __repr__(&self) -> String {
        let r = &self.inner;
        format!(
            "QuotaRefusal(account={}, limit={:?}, limit_value={}, remaining={}, retry_after_ms={:?}, reset_ms={:?})",
            r.account,
            r.limit.name(),
            r.limit_value,
            r.remaining,
            r.retry_after_ns.map(ceil_ms),
            r.reset_ns.map(ceil_ms)
        )
    }
}

/// Up to four account indexes, from an int or a tuple/list of ints, without a Vec.
fn accounts_arg(obj: &Bound<'_, PyAny>) -> PyResult<([u32; 4], usize)> {
    let mut out = [0u32; 4];
    if obj.is_instance_of::<PyInt>() {
        out[0] = obj.extract()?;
        return Ok((out, 1));
    }
    let mut fill = |items: &mut dyn Iterator<Item = Bound<'_, PyAny>>| -> PyResult<usize> {
        let mut n = 0;
        for item in items {
            if n == out.len() {
                return Err(PyValueError::new_err("a reservation spans 1 to 4 accounts"));
            }
            out[n] = item.extract()?;
            n += 1;
        }
        Ok(n)
    };
    let n = if let Ok(t) = obj.cast::<PyTuple>() {
        fill(&mut t.iter())?
    } else if let Ok(l) = obj.cast::<PyList>() {
        fill(&mut l.iter())?
    } else {
        let mut it = obj.try_iter()?.collect::<PyResult<Vec<_>>>()?.into_iter();
        fill(&mut it)?
    };
    Ok((out, n))
}

fn limit_arg(name: &str) -> PyResult<Limit> {
    Limit::parse(name).map_err(quota_err)
}

fn now_or_clock(now_ns: Option<u64>) -> u64 {
    now_ns.unwrap_or_else(quota::clock_ns)
}

/// The shared quota table (see `rust/quota`): budgets, rate limits and concurrency per account,
/// in a file every worker process maps.
///
/// The per-request calls (reserve, settle, cancel, extend, charge) keep the GIL: each is a few
/// atomic operations, cheaper than releasing and retaking it. Calls that scan the table or touch
/// the file release it.
#[pyclass(module = "tokenhub._core", name = "QuotaTable", frozen)]
struct PyQuotaTable {
    inner: QuotaTable,
}

#[pymethods]
impl PyQuotaTable {
    #[classattr]
    const UNLIMITED: u64 = quota::UNLIMITED;

    #[classattr]
    const NAME_MAX: usize = quota::NAME_MAX;

    /// Creates a fresh table at `path` (replacing the file atomically).
    #[staticmethod]
    #[pyo3(signature = (path, accounts=1024, reservations=16384))]
    fn create(py: Python<'_>, path: PathBuf, accounts: u32, reservations: u32) -> PyResult<Self> {
        let inner = py
            .detach(|| QuotaTable::create(&path, accounts, reservations))
            .map_err(quota_err)?;
        Ok(PyQuotaTable { inner })
    }

    /// Maps a table another process created.
    #[staticmethod]
    fn attach(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| QuotaTable::attach(&path)).map_err(quota_err)?;
        Ok(PyQuotaTable { inner })
    }

    /// A table in anonymous shared memory: this process's threads and the children it forks.
    #[staticmethod]
    #[pyo3(signature = (accounts=1024, reservations=16384))]
    fn anonymous(accounts: u32, reservations: u32) -> PyResult<Self> {
        let inner = QuotaTable::anonymous(accounts, reservations).map_err(quota_err)?;
        Ok(PyQuotaTable { inner })
    }

    /// CLOCK_MONOTONIC in ns: the clock of deadlines and rate limits, in every process.
    #[staticmethod]
    fn clock_ns() -> u64 {
        quota::clock_ns()
    }

    #[getter]
    fn path(&self) -> Option<String> {
        self.inner.path().map(path_str)
    }

    #[getter]
    fn account_capacity(&self) -> u32 {
        self.inner.account_capacity()
    }

    #[getter]
    fn reservation_capacity(&self) -> u32 {
        self.inner.reservation_capacity()
    }

    /// The index of the account `name`, created with every limit unlimited if new.
    fn account(&self, name: &str) -> PyResult<u32> {
        self.inner.account(name).map_err(quota_err)
    }

    fn find_account(&self, name: &str) -> PyResult<Option<u32>> {
        self.inner.find_account(name).map_err(quota_err)
    }

    fn account_name(&self, index: u32) -> PyResult<String> {
        self.inner.account_name(index).map_err(quota_err)
    }

    fn set_limit(&self, index: u32, limit: &str, value: u64) -> PyResult<()> {
        self.inner
            .set_limit(index, limit_arg(limit)?, value)
            .map_err(quota_err)
    }

    fn get_limit(&self, index: u32, limit: &str) -> PyResult<u64> {
        self.inner
            .get_limit(index, limit_arg(limit)?)
            .map_err(quota_err)
    }

    /// Raises (or lowers) a budget's limit by `delta`; returns the new limit.
    fn add_budget(&self, index: u32, limit: &str, delta: i64) -> PyResult<u64> {
        self.inner
            .add_budget(index, limit_arg(limit)?, delta)
            .map_err(quota_err)
    }

    /// Starts a new period for a budget; returns the usage cleared.
    fn reset_used(&self, index: u32, limit: &str) -> PyResult<u64> {
        self.inner
            .reset_used(index, limit_arg(limit)?)
            .map_err(quota_err)
    }

    /// What a budget can still take (limit - held - used), or UNLIMITED.
    fn available(&self, index: u32, limit: &str) -> PyResult<u64> {
        self.inner
            .available(index, limit_arg(limit)?)
            .map_err(quota_err)
    }

    /// Gives back up to `amount` of a budget's used; returns the amount released.
    fn release_used(&self, index: u32, limit: &str, amount: u64) -> PyResult<u64> {
        self.inner
            .release_used(index, limit_arg(limit)?, amount)
            .map_err(quota_err)
    }

    /// Reserves on every account (all or none): the reservation id, or a QuotaRefusal.
    #[pyo3(signature = (accounts, tokens=0, money=0, requests=1, concurrent=true, ttl_ms=300_000, now_ns=None))]
    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &self,
        py: Python<'_>,
        accounts: &Bound<'_, PyAny>,
        tokens: u64,
        money: u64,
        requests: u64,
        concurrent: bool,
        ttl_ms: u64,
        now_ns: Option<u64>,
    ) -> PyResult<Py<PyAny>> {
        let (ids, n) = accounts_arg(accounts)?;
        let amounts = Amounts {
            tokens,
            money,
            requests,
            concurrent,
        };
        match self
            .inner
            .reserve(&ids[..n], amounts, ttl_ms, now_or_clock(now_ns))
            .map_err(quota_err)?
        {
            Ok(id) => Ok(id.into_pyobject(py)?.into_any().unbind()),
            Err(r) => Ok(Py::new(py, PyQuotaRefusal { inner: r })?.into_any()),
        }
    }

    /// Ends a reservation with its real usage: (overrun_tokens, overrun_money, late).
    #[pyo3(signature = (reservation, tokens=0, money=0, requests=None, now_ns=None))]
    fn settle(
        &self,
        reservation: u64,
        tokens: u64,
        money: u64,
        requests: Option<u64>,
        now_ns: Option<u64>,
    ) -> PyResult<(u64, u64, bool)> {
        let actual = Actual {
            tokens,
            money,
            requests,
        };
        let s = self
            .inner
            .settle(reservation, actual, now_or_clock(now_ns))
            .map_err(quota_err)?;
        Ok((s.overrun_tokens, s.overrun_money, s.late))
    }

    /// Gives everything back; False if the reservation had already expired.
    fn cancel(&self, reservation: u64) -> PyResult<bool> {
        self.inner.cancel(reservation).map_err(quota_err)
    }

    /// Reserves more on a live reservation and pushes its deadline; None or a QuotaRefusal.
    #[pyo3(signature = (reservation, tokens=0, money=0, ttl_ms=300_000, now_ns=None))]
    fn extend(
        &self,
        reservation: u64,
        tokens: u64,
        money: u64,
        ttl_ms: u64,
        now_ns: Option<u64>,
    ) -> PyResult<Option<PyQuotaRefusal>> {
        Ok(self
            .inner
            .extend(reservation, tokens, money, ttl_ms, now_or_clock(now_ns))
            .map_err(quota_err)?
            .map(|inner| PyQuotaRefusal { inner }))
    }

    /// Records usage no reservation covers (all of it as overrun).
    #[pyo3(signature = (accounts, tokens=0, money=0, requests=0, now_ns=None))]
    fn charge(
        &self,
        accounts: &Bound<'_, PyAny>,
        tokens: u64,
        money: u64,
        requests: u64,
        now_ns: Option<u64>,
    ) -> PyResult<()> {
        let (ids, n) = accounts_arg(accounts)?;
        let amounts = Amounts {
            tokens,
            money,
            requests,
            concurrent: false,
        };
        self.inner
            .charge(&ids[..n], amounts, now_or_clock(now_ns))
            .map_err(quota_err)
    }

    /// Expires the held reservations past their deadline; returns how many.
    #[pyo3(signature = (now_ns=None))]
    fn expire_due(&self, py: Python<'_>, now_ns: Option<u64>) -> usize {
        let now = now_or_clock(now_ns);
        py.detach(|| self.inner.expire_due(now))
    }

    /// held, settled, cancelled, expired or "settled after expiry".
    fn reservation_state(&self, reservation: u64) -> PyResult<&'static str> {
        self.inner.reservation_state(reservation).map_err(quota_err)
    }

    /// (rpm limit, rpm remaining, rpm reset ms, tpm limit, tpm remaining, tpm reset ms).
    #[pyo3(signature = (index, now_ns=None))]
    fn rate_status(
        &self,
        index: u32,
        now_ns: Option<u64>,
    ) -> PyResult<(u64, u64, u64, u64, u64, u64)> {
        let (r, t) = self
            .inner
            .rate_status(index, now_or_clock(now_ns))
            .map_err(quota_err)?;
        Ok((
            r.limit,
            r.remaining,
            ceil_ms(r.reset_ns),
            t.limit,
            t.remaining,
            ceil_ms(t.reset_ns),
        ))
    }

    /// One account's limits and counters, as a dict of ints.
    #[pyo3(signature = (index, now_ns=None))]
    fn snapshot<'py>(
        &self,
        py: Python<'py>,
        index: u32,
        now_ns: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let s = self
            .inner
            .snapshot(index, now_or_clock(now_ns))
            .map_err(quota_err)?;
        let d = PyDict::new(py);
        for (dim, b) in [
            ("tokens", s.tokens),
            ("money", s.money),
            ("requests", s.requests),
        ] {
            d.set_item(format!("{dim}_limit"), b.limit)?;
            d.set_item(format!("{dim}_used"), b.used)?;
            d.set_item(format!("{dim}_held"), b.held)?;
            d.set_item(format!("{dim}_overrun"), b.overrun)?;
        }
        d.set_item("concurrent_limit", s.concurrent_limit)?;
        d.set_item("inflight", s.inflight)?;
        for (dim, r) in [("rpm", s.rpm), ("tpm", s.tpm)] {
            d.set_item(format!("{dim}_limit"), r.limit)?;
            d.set_item(format!("{dim}_remaining"), r.remaining)?;
            d.set_item(format!("{dim}_reset_ms"), ceil_ms(r.reset_ns))?;
        }
        d.set_item("admitted", s.admitted)?;
        d.set_item("refused", s.refused)?;
        Ok(d)
    }

    /// Counts over the whole table (one pass over every slot, without the GIL).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = py.detach(|| self.inner.stats());
        let d = PyDict::new(py);
        for (k, v) in [
            ("account_capacity", t.account_capacity as u64),
            ("accounts", t.accounts as u64),
            ("reservation_capacity", t.reservation_capacity as u64),
            ("held", t.held),
            ("busy", t.busy),
            ("free", t.free),
            ("reserved", t.reserved),
            ("settled", t.settled),
            ("cancelled", t.cancelled),
            ("expired", t.expired),
            ("late", t.late),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMeter>()?;
    m.add_class::<PyStreamCounter>()?;
    relay::register(m)?;
    m.add_class::<PyQuotaTable>()?;
    m.add_class::<PyQuotaRefusal>()?;
    router::register(m)?;
    m.add("VocabError", m.py().get_type::<VocabError>())?;
    m.add("QuotaError", m.py().get_type::<QuotaError>())?;
    m.add("QuotaFileError", m.py().get_type::<QuotaFileError>())?;
    m.add("QuotaFullError", m.py().get_type::<QuotaFullError>())?;
    m.add("ReservationError", m.py().get_type::<ReservationError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
