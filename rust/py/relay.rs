//! `SseRelay` and `AnthropicRelay`: the glue over `rust/relay`.

use super::{PyMeter, DETACH_BYTES};
use crate::relay::{AnthropicScanner, RelayError, SseScanner, DEFAULT_MAX_EVENT};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::Arc;

/// One upstream event stream, scanned as it is relayed (see `rust/relay`).
#[pyclass(module = "tokenhub._core", name = "SseRelay")]
struct PySseRelay {
    inner: SseScanner,
}

#[pymethods]
impl PySseRelay {
    #[new]
    #[pyo3(signature = (keep_usage, meter=None, max_event=DEFAULT_MAX_EVENT))]
    fn new(keep_usage: bool, meter: Option<Bound<'_, PyMeter>>, max_event: usize) -> Self {
        let inner = match meter {
            Some(m) => SseScanner::with_meter(keep_usage, Arc::clone(&m.get().inner), max_event),
            None => SseScanner::new(keep_usage),
        };
        PySseRelay { inner }
    }

    /// Takes one upstream read; returns the whole events to forward (possibly empty). Raises
    /// ValueError when an event grows past `max_event` bytes without ending.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        relayed(py, data, |data| inner.feed(data))
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

    /// A chunk with a top-level `error` object (a mid-stream failure) was seen.
    #[getter]
    fn errored(&self) -> bool {
        self.inner.errored()
    }

    /// The data payload (JSON) of the last chunk that carried usage, if any.
    #[getter]
    fn usage<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.usage().map(|u| PyBytes::new(py, u))
    }

    /// A JSON object with the first chunk's id, object, created and model (those it has).
    #[getter]
    fn head<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.head().map(|h| PyBytes::new(py, h))
    }

    /// Output tokens so far, all choices together (0 without a meter).
    #[getter]
    fn output_tokens(&mut self) -> usize {
        self.inner.output_tokens()
    }

    /// {choice index: output tokens so far} for each choice counted apart.
    fn choice_tokens<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (index, tokens) in self.inner.choice_tokens() {
            d.set_item(index, tokens)?;
        }
        Ok(d)
    }

    /// Whole events seen so far.
    #[getter]
    fn events(&self) -> u64 {
        self.inner.events()
    }

    /// The client asked for usage, none came, and `[DONE]` was held back: the gateway sends a
    /// usage chunk of its own, then `[DONE]`.
    #[getter]
    fn held_done(&self) -> bool {
        self.inner.held_done()
    }

    /// Bytes held back until their event's blank line arrives.
    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }
}

/// One read fed to a relay (`feed`): its events for Python, or the refusal as ValueError.
fn relayed<'py, F>(py: Python<'py>, data: &[u8], feed: F) -> PyResult<Bound<'py, PyBytes>>
where
    F: FnOnce(&[u8]) -> Result<Vec<u8>, RelayError> + Send,
{
    // A large read is scanned with the GIL released; a small one is not worth the switch.
    let out = if data.len() < DETACH_BYTES {
        feed(data)
    } else {
        py.detach(|| feed(data))
    };
    match out {
        Ok(out) => Ok(PyBytes::new(py, &out)),
        Err(e) => Err(PyValueError::new_err(e.to_string())),
    }
}

/// One upstream Anthropic Messages stream, scanned as it is relayed (see
/// `rust/relay/anthropic.rs`).
#[pyclass(module = "tokenhub._core", name = "AnthropicRelay")]
struct PyAnthropicRelay {
    inner: AnthropicScanner,
}

#[pymethods]
impl PyAnthropicRelay {
    #[new]
    #[pyo3(signature = (meter=None, max_event=DEFAULT_MAX_EVENT))]
    fn new(meter: Option<Bound<'_, PyMeter>>, max_event: usize) -> Self {
        let meter = meter.map(|m| Arc::clone(&m.get().inner));
        PyAnthropicRelay {
            inner: AnthropicScanner::new(meter, max_event),
        }
    }

    /// Takes one upstream read; returns the whole events in it, unchanged (possibly empty).
    /// Raises ValueError when an event grows past `max_event` bytes without ending.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let inner = &mut self.inner;
        relayed(py, data, |data| inner.feed(data))
    }

    /// The upstream closed: the held-back rest as a last event, terminated (or empty).
    fn finish<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.finish())
    }

    /// `message_stop` has been seen.
    #[getter]
    fn done(&self) -> bool {
        self.inner.done()
    }

    /// A content block delta with text, thinking or tool-call JSON was seen.
    #[getter]
    fn first_token(&self) -> bool {
        self.inner.first_token()
    }

    /// An `error` event (a mid-stream failure) was seen.
    #[getter]
    fn errored(&self) -> bool {
        self.inner.errored()
    }

    /// The merged usage object (Anthropic's keys) as JSON, if any usage was seen.
    #[getter]
    fn usage<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.usage().map(|u| PyBytes::new(py, u))
    }

    /// A JSON object with `message_start`'s message id and model (those it has).
    #[getter]
    fn head<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.head().map(|h| PyBytes::new(py, h))
    }

    /// Output tokens so far, all content blocks together (0 without a meter).
    #[getter]
    fn output_tokens(&mut self) -> usize {
        self.inner.output_tokens()
    }

    /// {content block index: output tokens so far} for each block counted apart.
    fn block_tokens<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (index, tokens) in self.inner.block_tokens() {
            d.set_item(index, tokens)?;
        }
        Ok(d)
    }

    /// Whole events seen so far.
    #[getter]
    fn events(&self) -> u64 {
        self.inner.events()
    }

    /// Always False: an Anthropic stream carries its usage, nothing is held back.
    #[getter]
    fn held_done(&self) -> bool {
        false
    }

    /// Bytes held back until their event's blank line arrives.
    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySseRelay>()?;
    m.add_class::<PyAnthropicRelay>()
}
