//! Errors of the simulator.

/// Why a run or a report failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A config value is out of the range the model supports.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// Writing a report failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding or decoding a JSON report failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A child run of the benchmark failed.
    #[error("benchmark run failed: {0}")]
    Bench(String),
}
