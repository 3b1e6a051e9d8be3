use std::fmt;

/// Everything that can go wrong when building or driving a router or a tier scorer. Routing
/// itself never fails: with every deployment down, `choose` still answers (reason `degraded`).
///
/// Mapped to Python exceptions in one place (`py::router::router_err`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterError {
    /// The policy name is not one of [`super::Policy::ALL`].
    UnknownPolicy(String),
    /// A router needs at least one deployment.
    NoDeployments,
    /// More deployments than a decision can name (indexes are `u16`).
    TooManyDeployments { count: usize, max: usize },
    /// A weighted policy (swrr, random, priority) over deployments whose weights are all zero.
    ZeroTotalWeight { policy: &'static str },
    /// A number out of range: negative, zero where a limit must be positive, not finite.
    Invalid(String),
    /// A deployment index past the end of the router's list.
    BadIndex { index: usize, len: usize },
}

impl fmt::Display for RouterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouterError::UnknownPolicy(name) => write!(
                f,
                "unknown routing policy {name:?} \
                 (expected swrr, random, p2c, latency, cheapest or priority)"
            ),
            RouterError::NoDeployments => f.write_str("a router needs at least one deployment"),
            RouterError::TooManyDeployments { count, max } => {
                write!(f, "{count} deployments: a router holds at most {max}")
            }
            RouterError::ZeroTotalWeight { policy } => write!(
                f,
                "policy {policy:?} routes by weight but every deployment has weight 0 \
                 (give at least one a positive weight)"
            ),
            RouterError::Invalid(message) => f.write_str(message),
            RouterError::BadIndex { index, len } => {
                write!(
                    f,
                    "deployment index {index} out of range (the router has {len})"
                )
            }
        }
    }
}

impl std::error::Error for RouterError {}

pub type Result<T> = std::result::Result<T, RouterError>;

/// A count or price from a signed source (Python ints, config files) as `u64`, or a message
/// naming the field: negative numbers are a configuration mistake, not a wrap-around.
pub fn non_negative(what: &str, value: i64) -> Result<u64> {
    u64::try_from(value)
        .map_err(|_| RouterError::Invalid(format!("{what} must be >= 0, got {value}")))
}
