//! tokenhub's CPU-bound core.
//!
//! The domain modules are plain Rust and build and test without Python (`cargo test`); the PyO3
//! glue lives in [`py`] behind the `python` feature, as tiktoken does it.

pub mod meter;
pub mod quota;
pub mod relay;
pub mod router;

#[cfg(feature = "python")]
mod py;
