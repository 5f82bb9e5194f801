//! Logging, tracing and metrics setup shared by Meridian's binaries.
#![deny(missing_docs)]

pub mod metrics;
pub mod propagation;
pub mod telemetry;
