//! PyO3 glue: thin wrappers over the plain-Rust core, and the one place where core errors
//! become Python exceptions.
//!
//! Inputs are borrowed (`&str`, `PyBackedStr`) rather than copied, and any call whose cost grows
//! with its input releases the GIL (`Python::detach`).

use crate::meter::{Meter, MeterError, StreamState};
use crate::relay::SseScanner;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyBytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

create_exception!(
    _core,
    VocabError,
    PyValueError,
    "A vocabulary is missing, unreadable or malformed (the message names the file and line)."
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

/// One upstream event stream, scanned as it is relayed (see `rust/relay`).
#[pyclass(module = "tokenhub._core", name = "SseRelay")]
struct PySseRelay {
    inner: SseScanner,
}

#[pymethods]
impl PySseRelay {
    #[new]
    #[pyo3(signature = (keep_usage))]
    fn new(keep_usage: bool) -> Self {
        PySseRelay {
            inner: SseScanner::new(keep_usage),
        }
    }

    /// Takes one upstream read; returns the whole events to forward (possibly empty).
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.feed(data))
    }

    /// The upstream closed: the held-back rest as a last event, terminated (or empty).
    fn finish<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.finish())
    }

    /// The `[DONE]` event has been seen.
    #[getter]
    fn done(&self) -> bool {
        self.inner.done()
    }

    /// A chunk with generated text (content, reasoning, tool call or legacy text) was seen.
    #[getter]
    fn first_token(&self) -> bool {
        self.inner.first_token()
    }

    /// The data payload (JSON) of the last chunk that carried usage, if any.
    #[getter]
    fn usage<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.usage().map(|u| PyBytes::new(py, u))
    }

    /// Every data payload so far, for metering a stream without usage (empty once usage came).
    fn payloads<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.inner.payloads().map(|p| PyBytes::new(py, p)).collect()
    }

    /// Whole events seen so far.
    #[getter]
    fn events(&self) -> u64 {
        self.inner.events()
    }

    /// Bytes held back until their event's blank line arrives.
    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMeter>()?;
    m.add_class::<PyStreamCounter>()?;
    m.add_class::<PySseRelay>()?;
    m.add("VocabError", m.py().get_type::<VocabError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
