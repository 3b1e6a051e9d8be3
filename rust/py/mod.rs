//! PyO3 glue: thin wrappers over the plain-Rust core, and the one place where core errors
//! become Python exceptions.
//!
//! Inputs are borrowed (`&str`, `PyBackedStr`) rather than copied, and any call whose cost grows
//! with its input releases the GIL (`Python::detach`).

use crate::meter::{Meter, MeterError, StreamState};
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMeter>()?;
    m.add_class::<PyStreamCounter>()?;
    m.add("VocabError", m.py().get_type::<VocabError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
