//! A running region: its configuration, storage, actors and metrics, shared by every handler.

use crate::actors::partition::{PartitionRouter, PartitionShared};
use crate::api::error::ApiError;
use crate::api::extract::{Ack, ReadConsistency};
use crate::api::in_doubt::InDoubt;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::peers::{Peer, Peers};
use crate::startup::{self, StartupPort};
use crate::storage::{BucketSource, IdempotencyRecord, LogGap, OpenedDb, Storage, StorageError};
use meridian_shared::encoding::encoded_kind;
use meridian_shared::hlc::Hlc;
use meridian_shared::home::rendezvous;
use meridian_shared::session::SessionToken;
use meridian_shared::wire::below_gaps;
use meridian_shared::{Actor, BucketDef, BucketType, RegionName};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why a region could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage could not be opened (or belongs to someone else).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The port could not answer peers' start-up questions.
    #[error("cannot answer peers on the port: {0}")]
    Port(std::io::Error),
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
    /// Live state of every peer.
    pub peers: Peers,
    /// Idempotency keys a forward left in doubt: their retries must not fail over.
    pub in_doubt: InDoubt,
    /// Per origin, what every region had applied at the peers' last heartbeats: a session
    /// token needs no entry up to it, since every region covers it.
    applied_everywhere: std::sync::RwLock<BTreeMap<Actor, u64>>,
    /// Buckets whose type a peer's definition changed, for the bucket sweep.
    retyped: mpsc::UnboundedSender<String>,
    /// The sweep's end of `retyped`, until it starts.
    retyped_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// This data directory started empty (in a cluster that already held data, or whose
    /// peers did not all answer), or without states it once held (a new incarnation): until
    /// anti-entropy has caught it up, it may lack what a session saw elsewhere, and session
    /// tokens leave out what every region had applied.
    started_without_history: bool,
}

impl Region {
    /// Opens storage and starts the partition actors. Must run inside an actix system.
    ///
    /// Before accepting writes it asks the peers how much of its incarnation they have seen:
    /// if they have seen more than this data directory holds (a restored or copied disk), it
    /// starts a new incarnation so no sequence number or dot is ever reused.
    /// It asks for up to `startup_peer_wait_ms`, while `port` answers the same question for
    /// peers that are starting too.
    pub async fn open(config: Config, port: &mut StartupPort) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new(config.region.as_str())?);
        let mut opened = OpenedDb::open(
            &config.data_dir,
            &config.region,
            &config.cluster_id,
            config.storage_cache_bytes,
            Duration::from_millis(config.checkpoint_interval_ms),
        )?;
        let fresh = opened.commits() == 0 && opened.last_seq() == 0;
        // Peers starting at the same moment answer each other meanwhile. An empty directory
        // asks too: it lacks nothing only in a new cluster (every peer answers, all empty).
        let wait = if config.peers.is_empty() {
            Duration::ZERO
        } else {
            port.answer_peers(&config, startup::heartbeat_from_disk(&config, &opened)?)
                .map_err(StartError::Port)?;
            Duration::from_millis(config.startup_peer_wait_ms)
        };
        let seen = startup::peers_have_seen(&config, opened.identity().incarnation, wait).await;
        let mut without_history = fresh && !seen.all_empty;
        if seen.commits > opened.commits() {
            tracing::warn!(
                seen = seen.commits,
                holds = opened.commits(),
                "peers have seen more commits from this region than its disk holds: a restored \
                 old copy; its key states are dropped and refilled by anti-entropy"
            );
            opened.reincarnate(true, seen.commits)?;
            without_history = true;
        } else if seen.seq > opened.last_seq() {
            tracing::warn!(
                seen = seen.seq,
                holds = opened.last_seq(),
                "peers have seen more of this region than its disk holds"
            );
            opened.reincarnate(false, 0)?;
            without_history = true;
        }
        let storage = Storage::start(opened, config.commit_max_batch, metrics.clone())?;
        let progress = storage.peer_progress()?;
        let peers = Peers::new(&config, &progress);
        metrics.register_peers(peers.iter().map(|p| p.name.as_str()));
        // Peers that answered just now are up: quorum and all operations need not wait for
        // the first heartbeat round.
        peers
            .iter()
            .filter(|p| seen.serving.contains(&p.name))
            .for_each(|p| p.heard_from());
        let shared = Arc::new(PartitionShared {
            storage: storage.clone(),
            cache_bytes: config.state_cache_bytes / config.partitions.max(1),
            max_state_bytes: config.state_limit(),
            hlc: Arc::new(Hlc::new()),
            metrics: metrics.clone(),
        });
        let partitions =
            PartitionRouter::start(config.partitions, config.partition_threads(), shared);
        let regions = config.regions();
        let (retyped, retyped_rx) = mpsc::unbounded_channel();
        let in_doubt = InDoubt::new(
            Duration::from_secs(config.idempotency_ttl_secs),
            metrics.forwards_in_doubt.clone(),
            metrics.forwards_in_doubt_evicted.clone(),
        );
        Ok(Self {
            config,
            storage,
            partitions,
            metrics,
            regions,
            peers,
            in_doubt,
            applied_everywhere: Default::default(),
            retyped,
            retyped_rx: std::sync::Mutex::new(Some(retyped_rx)),
            started_without_history: without_history,
        })
    }

    /// Starts membership, one replicator per peer, log GC, tombstone GC and anti-entropy.
    pub fn start_background(self: &Arc<Self>) {
        use actix::Actor;
        crate::actors::membership::Membership::new(self.clone()).start();
        // One thread for every replicator: a thread each added a wakeup per commit, and on a
        // region's share of two cores that cost more than one peer's log read and encode
        // waiting behind another's (three regions, 64 clients: 19.6-20.1k writes/s against
        // 18.1k). A backlog's large batches are read off this thread (see `send_batch`).
        if !self.peers.is_empty() {
            let arbiter = actix::Arbiter::new();
            for peer in self.peers.iter() {
                let (region, peer) = (self.clone(), peer.clone());
                crate::actors::replicator::Replicator::start_in_arbiter(
                    &arbiter.handle(),
                    move |_| crate::actors::replicator::Replicator::new(region, peer),
                );
            }
        }
        crate::actors::log_gc::LogGc::new(self.clone()).start();
        if let Some(retyped) = self.retyped_rx.lock().ok().and_then(|mut rx| rx.take()) {
            actix::spawn(crate::actors::bucket_sweep::run(self.clone(), retyped));
        }
        if self.config.tombstone_gc_interval_ms > 0 {
            crate::actors::tombstone_gc::TombstoneGc::new(self.clone()).start();
        }
        if self.config.anti_entropy_interval_ms > 0 {
            crate::actors::anti_entropy::AntiEntropy::new(self.clone()).start();
        } else {
            tracing::warn!("anti-entropy is disabled (anti_entropy_interval_ms = 0)");
        }
    }

    /// Stores a bucket definition a peer sent (its log, anti-entropy, a forward). When it is
    /// new here or replaces ours with one of another type, the bucket is swept of states of
    /// another type (see `bucket_sweep`).
    pub async fn adopt_bucket(&self, def: BucketDef) -> Result<(), StorageError> {
        let name = def.name.clone();
        let before = self.storage.bucket(&name).map(|def| def.kind);
        self.storage
            .submit_bucket(def, BucketSource::Replicated)?
            .await?;
        let after = self.storage.bucket(&name).map(|def| def.kind);
        // Also when the bucket is new here: states a peer pushed before its definition
        // arrived were stored unchecked.
        if before != after {
            if before.is_some() {
                tracing::warn!(bucket = %name, ?before, ?after,
                    "a concurrent definition of the bucket with another type won");
            }
            let _ = self.retyped.send(name);
        }
        Ok(())
    }

    /// Asks for a sweep of every bucket with a state of another type than its definition
    /// among `states` (this region's, found to differ by anti-entropy).
    pub fn sweep_if_foreign(&self, states: &[(String, String, Vec<u8>)]) {
        // States come grouped by bucket (key order): one definition lookup per bucket.
        let mut current: Option<(&str, Option<BucketType>)> = None;
        let mut asked: Option<&str> = None;
        for (bucket, _, state) in states {
            let kind = match current {
                Some((name, kind)) if name == bucket => kind,
                _ => {
                    let kind = self.storage.bucket(bucket).map(|def| def.kind);
                    current = Some((bucket, kind));
                    kind
                }
            };
            let foreign = kind.is_some_and(|kind| encoded_kind(state) != Some(kind));
            if foreign && asked != Some(bucket.as_str()) {
                let _ = self.retyped.send(bucket.clone());
                asked = Some(bucket.as_str());
            }
        }
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

    /// Whether an anti-entropy exchange has completed with every peer since start.
    pub fn caught_up(&self) -> bool {
        self.peers.iter().all(|p| p.synced())
    }

    /// Per origin incarnation, the highest contiguous sequence number applied here.
    pub fn applied(&self) -> BTreeMap<Actor, u64> {
        let mut applied = BTreeMap::new();
        self.each_applied(|origin, seq| {
            applied.insert(origin, seq);
        });
        applied
    }

    /// What this region is known to hold of every origin: [`Region::applied`], except that an
    /// origin whose log was accepted past a gap counts as applied up to the gap until an
    /// exchange has filled it. This is what peers are told (heartbeats, anti-entropy) and
    /// what session reads and tombstone GC rely on.
    pub fn held(&self) -> BTreeMap<Actor, u64> {
        let mut held = self.applied();
        below_gaps(&mut held, &self.gaps());
        held
    }

    /// Per origin incarnation whose log was accepted here past a gap not yet filled, what was
    /// applied of it before.
    pub fn gaps(&self) -> BTreeMap<Actor, u64> {
        let mut all = BTreeMap::new();
        for peer in self.peers.iter() {
            peer.with_gaps(|gaps| all.extend(gaps.iter().map(|(k, g)| (*k, g.before))));
        }
        all
    }

    /// Calls `each` for every entry of [`Region::applied`], without building the map.
    fn each_applied(&self, mut each: impl FnMut(Actor, u64)) {
        self.storage.with_applied(|applied| {
            for (origin, seq) in applied {
                each(*origin, *seq);
            }
        });
        each(self.storage.identity().incarnation, self.storage.last_seq());
    }

    /// The session token to return: the client's, merged with everything this region has
    /// applied from every origin (the answer may reflect any of it: a read's value replicated
    /// from elsewhere, a counter's sum), which covers this region's own writes too. Entries
    /// every region has applied are left out: they constrain no read, and the token stays
    /// small however many incarnations the cluster has seen.
    pub fn session_after(&self, mut token: SessionToken) -> SessionToken {
        self.each_applied(|origin, seq| token.observe(origin, seq));
        if let Ok(everywhere) = self.applied_everywhere.read() {
            let all = |origin: &Actor| everywhere.get(origin).copied().unwrap_or(0);
            token.seen.retain(|origin, seq| *seq > all(origin));
        }
        token
    }

    /// Recomputes what every region has applied, after a peer's heartbeat.
    pub fn note_peer_applied(&self) {
        let mut everywhere = self.held();
        for peer in self.peers.iter() {
            match peer.held() {
                // Not heard from yet: nothing is known to be everywhere.
                None => everywhere.clear(),
                Some(theirs) => {
                    for (origin, seq) in everywhere.iter_mut() {
                        *seq = (*seq).min(theirs.get(origin).copied().unwrap_or(0));
                    }
                }
            }
        }
        if let Ok(mut stored) = self.applied_everywhere.write() {
            *stored = everywhere;
        }
    }

    /// The session token for a replayed answer: what [`Region::session_after`] gives, plus
    /// the first write, in the log of whichever region applied it.
    pub fn session_after_replay(
        &self,
        mut token: SessionToken,
        record: &IdempotencyRecord,
    ) -> SessionToken {
        let origin = record.origin.unwrap_or(self.storage.identity().incarnation);
        token.observe(origin, record.seq);
        self.session_after(token)
    }

    /// `ack` for a replayed answer. This region's own write is awaited like a new one; a
    /// write another region applied (its record replicated here) is durable at its origin and
    /// here, and no more can be confirmed from here (504 when more is required).
    pub async fn await_replay_ack(
        &self,
        ack: Ack,
        record: &IdempotencyRecord,
    ) -> Result<(), ApiError> {
        if record.origin.is_none() {
            return self.await_ack(ack, record.seq).await;
        }
        let needed = self.others_required(ack);
        if needed <= 1 {
            return Ok(());
        }
        Err(ApiError::new(
            actix_web::http::StatusCode::GATEWAY_TIMEOUT,
            "consistency_timeout",
            format!(
                "this retry was already applied by another region; {} can confirm it in that \
                 region and here, not in the {needed} other regions required",
                self.name()
            ),
        ))
    }

    /// Refuses a session read this region cannot serve, after any waiting or forwarding has
    /// been tried (quorum and all reads are served by [`crate::repair::read_merged`]).
    pub fn check_read(
        &self,
        level: ReadConsistency,
        session: &SessionToken,
    ) -> Result<(), ApiError> {
        match level {
            ReadConsistency::Local | ReadConsistency::Home => Ok(()),
            ReadConsistency::Session if self.covers(session) => Ok(()),
            ReadConsistency::Session => match self.session_ahead(session) {
                Some((claimed, written)) => Err(ApiError::new(
                    actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                    "session_ahead_of_region",
                    format!(
                        "the session token claims write {claimed} of this region, which has \
                         made only {written}: it is forged, or was issued before this region \
                         lost data; start a new session"
                    ),
                )),
                None => Err(ApiError::new(
                    actix_web::http::StatusCode::GATEWAY_TIMEOUT,
                    "consistency_timeout",
                    "this region has not yet applied everything the session token has seen",
                )),
            },
            ReadConsistency::Quorum | ReadConsistency::All => Ok(()),
        }
    }

    /// `(claimed, written)` when `session` claims more of this region's own log than it has
    /// written: no wait can cover that (a forged token, or one issued by a copy of this
    /// region's data that has since been lost; the home may still hold those writes).
    fn session_ahead(&self, session: &SessionToken) -> Option<(u64, u64)> {
        let written = self.storage.last_seq();
        let claimed = *session.seen.get(&self.storage.identity().incarnation)?;
        (claimed > written).then_some((claimed, written))
    }

    /// Whether this region holds everything `session` has seen. Not before a region that
    /// started without its history has completed an anti-entropy exchange with a peer: a
    /// token leaves out what every region had applied, which such a region may lack (any
    /// peer holds it, and an exchange brings it here). Nor past a gap accepted in a peer's
    /// log until an exchange with that peer has filled it.
    fn covers(&self, session: &SessionToken) -> bool {
        self.holds_history() && session.covered_by(&self.held())
    }

    /// Flags `peer` for a priority anti-entropy exchange, started from either side; the flag
    /// clears after a complete exchange that began after the last call.
    pub fn flag_for_anti_entropy(&self, peer: &Peer, why: &str) {
        peer.drops.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if !peer.ae_needed() {
            tracing::warn!(peer = %peer.name, why, "peer flagged for priority anti-entropy");
            peer.set_ae_needed(true);
            let _ = self.storage.submit_ae_flag(peer.name.as_str(), true);
        }
    }

    /// Records that `origin`'s log of `incarnation` is accepted past a gap here, its applied
    /// mark jumping from `before` to `upto`: the applied vector then claims entries this
    /// region never got. Queued before that mark, so it is durable no later.
    pub fn accept_log_gap(
        &self,
        origin: &str,
        incarnation: Actor,
        gap: LogGap,
    ) -> Result<(), ApiError> {
        let Some(peer) = self.peers.iter().find(|p| p.name.as_str() == origin) else {
            return Err(ApiError::new(
                actix_web::http::StatusCode::FORBIDDEN,
                "unknown_peer",
                format!("{origin} is not a peer of this region"),
            ));
        };
        peer.add_gap(incarnation, gap, |gaps| {
            self.storage.submit_log_gaps(origin, gaps)
        })?;
        self.flag_for_anti_entropy(peer, "its log reached us with a gap");
        Ok(())
    }

    /// After a complete exchange with a peer that held `held` when it began: this region now
    /// holds that much too, so the gaps it covers are filled.
    pub fn fill_gaps(&self, held: &BTreeMap<Actor, u64>) -> Result<(), StorageError> {
        for peer in self.peers.iter() {
            let filled = peer.fill_gaps(held, |gaps| {
                self.storage.submit_log_gaps(peer.name.as_str(), gaps)
            })?;
            if filled > 0 {
                tracing::info!(peer = %peer.name, filled, "anti-entropy filled gaps in its log");
            }
        }
        Ok(())
    }

    /// False while this region started without its history and no exchange has refilled it.
    fn holds_history(&self) -> bool {
        !self.started_without_history
            || self.peers.is_empty()
            || self.peers.iter().any(|p| p.synced())
    }

    /// Waits (bounded by `session_wait_ms`) until this region covers the session token.
    pub async fn await_session(&self, session: &SessionToken) -> bool {
        if self.covers(session) {
            return true;
        }
        if self.session_ahead(session).is_some() {
            // No wait covers it; the home may hold what the token claims.
            return false;
        }
        if !self.holds_history() {
            // Refilling takes an anti-entropy exchange: the home answers meanwhile.
            return false;
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.session_wait_ms);
        let mut applied = self.storage.applied_watch();
        let mut last_seq = self.storage.last_seq_watch();
        loop {
            let changed = async {
                tokio::select! {
                    _ = applied.changed() => {}
                    _ = last_seq.changed() => {}
                }
            };
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.covers(session);
            }
            if self.covers(session) {
                return true;
            }
        }
    }

    /// Other regions a `quorum` or `all` operation needs besides this one.
    pub fn others_needed(&self, all: bool) -> usize {
        if all {
            self.peers.len()
        } else {
            self.regions.len() / 2
        }
    }

    /// Other regions that must confirm a write for `ack`.
    fn others_required(&self, ack: Ack) -> usize {
        match ack {
            Ack::Local => 0,
            Ack::Quorum => self.others_needed(false),
            Ack::All => self.others_needed(true),
        }
    }

    /// Refuses, before anything is applied, a write whose `ack` the peers up now cannot meet
    /// (503, as for quorum reads): waiting on a region known to be down would only answer 504
    /// after the write was applied anyway, leaving the client unsure what happened.
    pub fn check_ack(&self, ack: Ack) -> Result<(), ApiError> {
        let needed = self.others_required(ack);
        let up = self.peers.iter().filter(|p| p.is_up()).count();
        if up >= needed {
            return Ok(());
        }
        let down: Vec<&str> = self
            .peers
            .iter()
            .filter(|p| !p.is_up())
            .map(|p| p.name.as_str())
            .collect();
        Err(ApiError::unavailable(format!(
            "ack={} needs {needed} other regions to confirm the write and only {up} are up \
             ({} down); nothing was written",
            format!("{ack:?}").to_lowercase(),
            down.join(", ")
        ))
        .nothing_applied())
    }

    /// Waits until enough peers have durably applied `seq` (504 when they do not in time).
    pub async fn await_ack(&self, ack: Ack, seq: u64) -> Result<(), ApiError> {
        let needed = self.others_required(ack);
        if needed == 0 {
            return Ok(());
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.ack_timeout_ms);
        let mut watches: Vec<_> = self.peers.iter().map(|p| p.acked_watch()).collect();
        loop {
            let have = watches.iter().filter(|w| *w.borrow() >= seq).count();
            if have >= needed {
                return Ok(());
            }
            let any_changed =
                futures_util::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())));
            if tokio::time::timeout_at(deadline, any_changed)
                .await
                .is_err()
            {
                return Err(ApiError::new(
                    actix_web::http::StatusCode::GATEWAY_TIMEOUT,
                    "consistency_timeout",
                    format!(
                        "the write is durable in {} but only {} of the {needed} other regions \
                         required confirmed it in time; it is not rolled back",
                        self.name(),
                        have
                    ),
                ));
            }
        }
    }
}
