//! The region's actors: partition actors own the read-merge-write of their keys; background
//! actors replicate, watch peers and collect the log.

pub mod log_gc;
pub mod membership;
pub mod partition;
pub mod replicator;
