//! The region's actors: partition actors own the read-merge-write of their keys; background
//! actors replicate, watch peers, repair divergence and collect the log.

pub mod anti_entropy;
pub mod bucket_sweep;
pub mod log_gc;
pub mod membership;
pub mod partition;
pub mod replicator;
pub mod tombstone_gc;
