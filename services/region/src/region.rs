//! A running region: its configuration, storage, actors and metrics, shared by every handler.

use crate::actors::partition::{PartitionRouter, PartitionShared};
use crate::api::error::ApiError;
use crate::api::extract::{Ack, ReadConsistency};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::storage::{OpenedDb, Storage, StorageError};
use meridian_shared::hlc::Hlc;
use meridian_shared::home::rendezvous;
use meridian_shared::session::SessionToken;
use meridian_shared::{Actor, BucketDef, RegionName};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why a region could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage could not be opened (or belongs to someone else).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Everything a request handler needs.
pub struct Region {
    /// Loaded configuration.
    pub config: Config,
    /// Durable storage.
    pub storage: Storage,
    /// Partition actors.
    pub partitions: PartitionRouter,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Every region of the cluster, sorted.
    pub regions: Vec<RegionName>,
}

impl Region {
    /// Opens storage and starts the partition actors. Must run inside an actix system.
    pub fn open(config: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new(config.region.as_str())?);
        let opened = OpenedDb::open(&config.data_dir, &config.region, &config.cluster_id)?;
        let storage = Storage::start(opened, config.commit_max_batch, metrics.clone())?;
        let shared = Arc::new(PartitionShared {
            storage: storage.clone(),
            hlc: Arc::new(Hlc::new()),
            metrics: metrics.clone(),
        });
        let partitions = PartitionRouter::start(config.partitions, config.worker_threads(), shared);
        let regions = config.regions();
        Ok(Self {
            config,
            storage,
            partitions,
            metrics,
            regions,
        })
    }

    /// This region's name.
    pub fn name(&self) -> &RegionName {
        &self.config.region
    }

    /// A bucket's definition, or 404 `bucket_not_found`.
    pub fn bucket(&self, name: &str) -> Result<BucketDef, ApiError> {
        self.storage
            .bucket(name)
            .ok_or_else(|| ApiError::no_bucket(name))
    }

    /// The key's home region: the bucket's `home_region`, else rendezvous hashing.
    pub fn home_of<'a>(&'a self, def: &'a BucketDef, key: &str) -> &'a RegionName {
        def.home_region
            .as_ref()
            .or_else(|| rendezvous(&self.regions, &def.name, key))
            .unwrap_or(&self.config.region)
    }

    /// Per origin incarnation, the highest contiguous sequence number applied here.
    pub fn applied(&self) -> BTreeMap<Actor, u64> {
        BTreeMap::from([(self.storage.identity().incarnation, self.storage.last_seq())])
    }

    /// The session token to return: the client's merged with what this region has applied.
    pub fn session_after(&self, mut token: SessionToken, seq: Option<u64>) -> SessionToken {
        let own = self.storage.identity().incarnation;
        token.observe(own, seq.unwrap_or_else(|| self.storage.last_seq()));
        token
    }

    fn single_region(&self) -> bool {
        self.config.peers.is_empty()
    }

    /// Refuses a read whose consistency this region cannot serve by itself.
    ///
    /// Cross-region reads arrive with replication; until then a region with peers answers
    /// 503 rather than pretend, and a single-region cluster satisfies every level locally.
    pub fn check_read(
        &self,
        level: ReadConsistency,
        home: &RegionName,
        session: &SessionToken,
    ) -> Result<(), ApiError> {
        let served_here = match level {
            ReadConsistency::Local => true,
            ReadConsistency::Home => home == self.name(),
            ReadConsistency::Session => session.covered_by(&self.applied()),
            ReadConsistency::Quorum | ReadConsistency::All => self.single_region(),
        };
        if served_here {
            Ok(())
        } else {
            Err(ApiError::unavailable(
                format!(
                "consistency={level:?} needs other regions, which this build does not reach yet"
            )
                .to_lowercase(),
            ))
        }
    }

    /// Refuses a write whose acknowledgement level this region cannot give by itself.
    pub fn check_ack(&self, ack: Ack) -> Result<(), ApiError> {
        if ack == Ack::Local || self.single_region() {
            Ok(())
        } else {
            Err(ApiError::unavailable(
                "ack=quorum and ack=all need replication, which this build does not have yet",
            ))
        }
    }
}
