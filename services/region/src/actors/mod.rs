//! The region's actors: partition actors own the read-merge-write of their keys.

pub mod partition;
