use std::fmt;

/// Everything that can go wrong when loading a vocabulary or using a meter.
///
/// Mapped to Python exceptions in one place (`py::errors`).
#[derive(Debug)]
pub enum MeterError {
    /// A vocabulary file could not be read.
    Io { path: String, message: String },
    /// A vocabulary file is malformed; `line` is 1-based when known.
    Corrupt {
        path: String,
        line: Option<usize>,
        message: String,
    },
    /// A pre-tokenizer pattern does not compile.
    Pattern { pattern: String, message: String },
    /// A token id that the vocabulary does not have.
    UnknownId(u32),
    /// Anything else reported by the `tokenizers` fallback.
    Tokenizer(String),
}

impl fmt::Display for MeterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeterError::Io { path, message } => {
                write!(f, "cannot read vocabulary file {path}: {message}")
            }
            MeterError::Corrupt {
                path,
                line: Some(line),
                message,
            } => {
                write!(f, "corrupt vocabulary file {path}, line {line}: {message}")
            }
            MeterError::Corrupt {
                path,
                line: None,
                message,
            } => {
                write!(f, "corrupt vocabulary file {path}: {message}")
            }
            MeterError::Pattern { pattern, message } => {
                write!(f, "invalid pre-tokenizer pattern {pattern:?}: {message}")
            }
            MeterError::UnknownId(id) => write!(f, "token id {id} is not in the vocabulary"),
            MeterError::Tokenizer(message) => write!(f, "tokenizer error: {message}"),
        }
    }
}

impl std::error::Error for MeterError {}

pub type Result<T> = std::result::Result<T, MeterError>;
