use std::fmt;

/// Everything that can go wrong with a quota table. A refusal (not enough quota) is not an
/// error: `reserve` and `extend` return it as a value.
///
/// Mapped to Python exceptions in one place (`py::quota_err`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaError {
    /// The table file could not be created, opened, sized or mapped.
    Io { path: String, message: String },
    /// The file is not a quota table this build can use (magic, version, layout or size).
    BadTable { path: String, message: String },
    /// Every account slot is taken (accounts are never removed; create a larger table).
    AccountsFull { capacity: u32 },
    /// Every reservation slot is held, even after expiring the due ones.
    ReservationsFull { capacity: u32 },
    /// An argument out of range: an empty or too long name, an account index, a capacity.
    Invalid(String),
    /// The id names no reservation of this table, or one whose slot has since been reused.
    UnknownReservation(u64),
    /// The reservation already ended (settled, cancelled, expired or settled after expiry).
    Finished { id: u64, state: &'static str },
    /// Another process has held the reservation's slot mid-update for far too long (it died
    /// inside a ~100 ns window of a quota call).
    Stuck { what: &'static str, index: u32 },
}

impl fmt::Display for QuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuotaError::Io { path, message } => write!(f, "quota table {path}: {message}"),
            QuotaError::BadTable { path, message } => {
                write!(f, "{path} is not a usable quota table: {message}")
            }
            QuotaError::AccountsFull { capacity } => write!(
                f,
                "quota table is full: all {capacity} account slots are taken \
                 (create the table with a larger account capacity)"
            ),
            QuotaError::ReservationsFull { capacity } => write!(
                f,
                "quota table is full: all {capacity} reservation slots are held \
                 (settle or cancel reservations, or create a larger table)"
            ),
            QuotaError::Invalid(message) => f.write_str(message),
            QuotaError::UnknownReservation(id) => write!(
                f,
                "unknown reservation {id:#x} (not from this table, or ended and its slot reused)"
            ),
            QuotaError::Finished { id, state } => {
                write!(f, "reservation {id:#x} has already ended ({state})")
            }
            QuotaError::Stuck { what, index } => {
                write!(
                    f,
                    "{what} slot {index} is stuck mid-update (a process died inside a quota call)"
                )
            }
        }
    }
}

impl std::error::Error for QuotaError {}

pub type Result<T> = std::result::Result<T, QuotaError>;
