//! Start-up identity check (DESIGN.md, "Identity"): before a region accepts writes it asks its
//! peers how much of it they have seen, so a restored old copy starts a new incarnation
//! instead of reusing sequence numbers they applied, and an empty directory learns whether it
//! joins a cluster that holds data (which it lacks) or a new one.
//!
//! Peers may be starting at the same moment (a whole cluster restarted): while a region asks,
//! its port answers the same question for them from its disk ([`StartupPort::answer_peers`])
//! and refuses everything else with a 503 that says nothing was applied.

use crate::api::error::ApiError;
use crate::config::Config;
use crate::peers::{http_client, peer_request};
use crate::storage::{OpenedDb, StorageError};
use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use meridian_shared::wire::{
    Heartbeat, PROTOCOL_VERSION, STARTING_HEADER, STARTUP_QUESTION_HEADER,
};
use meridian_shared::{Actor, RegionName};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Pause between questions to a peer that has not answered yet.
const ASK_AGAIN: Duration = Duration::from_millis(200);
/// Time one question may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// What reachable peers have seen of this region.
#[derive(Debug, Default)]
pub struct Seen {
    /// The most any has applied of our incarnation's log.
    pub seq: u64,
    /// The highest commit counter any has seen from us.
    pub commits: u64,
    /// The peers that answered as themselves and already serve: they start up, not waiting
    /// for a heartbeat.
    pub serving: Vec<RegionName>,
    /// Every peer answered, and none holds anything yet: a new cluster, in which a region
    /// starting on an empty disk lacks nothing.
    pub all_empty: bool,
}

/// Asks every peer what it has seen of `incarnation`, again until each has answered or `wait`
/// has passed (once when `wait` is zero).
pub async fn peers_have_seen(config: &Config, incarnation: Actor, wait: Duration) -> Seen {
    let client = http_client();
    let deadline = Instant::now() + wait;
    let asks = config.peers.iter().map(|(name, url)| {
        let client = &client;
        async move {
            loop {
                // The last question ends with the wait (a hung peer costs no more).
                let left = deadline.saturating_duration_since(Instant::now());
                let timeout = if wait.is_zero() {
                    ASK_TIMEOUT
                } else {
                    ASK_TIMEOUT.min(left.max(ASK_AGAIN))
                };
                let answer = ask(client, config, name, url, incarnation, timeout).await;
                if answer.is_ok() || Instant::now() + ASK_AGAIN >= deadline {
                    return (name, answer);
                }
                tokio::time::sleep(ASK_AGAIN).await;
            }
        }
    });
    let mut seen = Seen {
        all_empty: true,
        ..Seen::default()
    };
    let mut silent = Vec::new();
    for (name, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Ok(answer) => {
                seen.seq = seen.seq.max(answer.seq);
                seen.commits = seen.commits.max(answer.commits);
                seen.serving.extend(answer.serving);
                seen.all_empty &= answer.empty;
            }
            Err(why) => {
                seen.all_empty = false;
                silent.push(format!("{name}: {why}"));
            }
        }
    }
    if !wait.is_zero() && !silent.is_empty() {
        tracing::warn!(
            wait_ms = wait.as_millis() as u64,
            unanswered = %silent.join("; "),
            "not every peer answered the start-up question: if this data directory is a \
             restored copy, peers that did not answer cannot say so"
        );
    }
    seen
}

/// One question to one peer; why not when it does not answer as itself.
async fn ask(
    client: &reqwest::Client,
    config: &Config,
    name: &RegionName,
    url: &str,
    incarnation: Actor,
    timeout: Duration,
) -> Result<Answer, String> {
    let url = format!("{}/internal/v1/heartbeat", url.trim_end_matches('/'));
    let request = peer_request(client.get(url), config)
        .header(STARTUP_QUESTION_HEADER, "1")
        .timeout(timeout);
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let serving = !response.headers().contains_key(STARTING_HEADER);
    let beat: Heartbeat = response.json().await.map_err(|e| e.to_string())?;
    // Only the peer itself counts (membership refuses a URL that answers as another).
    if beat.region != *name
        || beat.cluster_id != config.cluster_id
        || beat.version != PROTOCOL_VERSION
    {
        return Err(format!(
            "answers as {} of cluster {:?}, protocol {}",
            beat.region, beat.cluster_id, beat.version
        ));
    }
    Ok(Answer {
        serving: serving.then(|| name.clone()),
        seq: beat.applied.get(&incarnation).copied().unwrap_or(0),
        commits: beat.seen_commits.get(&config.region).copied().unwrap_or(0),
        empty: beat.holds_nothing(),
    })
}

/// One peer's answer to the start-up question.
struct Answer {
    /// The peer's name when it already serves (not starting itself).
    serving: Option<RegionName>,
    /// How much of our incarnation it has applied.
    seq: u64,
    /// The highest commit counter it has seen from us.
    commits: u64,
    /// It holds nothing at all.
    empty: bool,
}

/// What this region answers to the start-up question before its storage runs: its disk's
/// identity and progress, as its heartbeat will report them.
pub fn heartbeat_from_disk(config: &Config, opened: &OpenedDb) -> Result<Heartbeat, StorageError> {
    let (applied, progress) = opened.progress()?;
    let identity = opened.identity();
    Ok(Heartbeat {
        version: PROTOCOL_VERSION,
        region: config.region.clone(),
        cluster_id: config.cluster_id.clone(),
        incarnation: identity.incarnation,
        last_seq: opened.last_seq(),
        applied,
        commits: opened.commits(),
        seen_commits: progress
            .commits
            .into_iter()
            .filter_map(|(peer, commits)| Some((RegionName::new(peer).ok()?, commits)))
            .collect(),
        gaps: progress
            .gaps
            .into_values()
            .flatten()
            .map(|(incarnation, gap)| (incarnation, gap.before))
            .collect(),
        // Not said: this answer is built once, before it is served.
        clock_ms: 0,
    })
}

/// The region's port while it starts: bound (connections refused, so peers fail over at
/// once), then listening to answer peers' start-up questions if the region must ask its own,
/// until the region's server takes it over.
pub struct StartupPort {
    socket: Socket,
    listener: Option<TcpListener>,
    responder: Option<ServerHandle>,
}

impl StartupPort {
    /// Binds `addr` without listening yet: the port is ours, and a port in use is a plain
    /// error before anything starts.
    pub fn reserve(addr: SocketAddr) -> std::io::Result<Self> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // Restarts must not wait for the previous process's connections in TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        Ok(Self {
            socket,
            listener: None,
            responder: None,
        })
    }

    /// Starts answering peers' start-up questions with `beat`, and everything else with a 503.
    /// Must run inside an actix system.
    pub fn answer_peers(&mut self, config: &Config, beat: Heartbeat) -> std::io::Result<()> {
        let listener = self.listen()?.try_clone()?;
        let beat = web::Data::new(beat);
        let config = web::Data::new(config.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(beat.clone())
                .app_data(config.clone())
                .route("/internal/v1/heartbeat", web::get().to(answer))
                .route("/healthz", web::get().to(alive))
                .default_service(web::to(starting))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        self.responder = Some(server.handle());
        actix_web::rt::spawn(server);
        Ok(())
    }

    /// The listening socket, for the region's server.
    pub fn listen(&mut self) -> std::io::Result<&TcpListener> {
        if self.listener.is_none() {
            self.socket.listen(4096)?;
            self.listener = Some(self.socket.try_clone()?.into());
        }
        self.listener
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no listener"))
    }

    /// Stops answering for the start-up once the region's server has its own copy of the
    /// socket, and closes this one: when that server stops, the port refuses connections.
    pub async fn retire(mut self) {
        if let Some(responder) = self.responder.take() {
            responder.stop(false).await;
        }
    }
}

impl Drop for StartupPort {
    /// A start-up that failed part way stops answering too (the stop is sent at once).
    fn drop(&mut self) {
        if let Some(responder) = self.responder.take() {
            drop(responder.stop(false));
        }
    }
}

/// Answers a peer's start-up question from the disk; any other heartbeat is refused, so that
/// membership does not count this region up before it serves.
async fn answer(
    req: HttpRequest,
    beat: web::Data<Heartbeat>,
    config: web::Data<Config>,
) -> HttpResponse {
    if !req.headers().contains_key(STARTUP_QUESTION_HEADER) {
        return starting().await;
    }
    match crate::api::internal::check_peer(&config, req.headers()) {
        // Marked: the asker counts the answer, but not this region as up yet.
        Ok(()) => HttpResponse::Ok()
            .insert_header((STARTING_HEADER, "true"))
            .json(&**beat),
        Err(error) => error.error_response(),
    }
}

/// Liveness while the region starts: the process runs and makes progress (a probe that
/// failed here would restart it in the middle of asking its peers); `/readyz` still says 503.
async fn alive() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((STARTING_HEADER, "true"))
        .json(serde_json::json!({"status": "starting"}))
}

/// Everything but the start-up question and liveness while the region starts.
async fn starting() -> HttpResponse {
    let mut response = ApiError::unavailable(
        "this region is starting: it is asking its peers what they have seen of it",
    )
    .error_response();
    response.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static(STARTING_HEADER),
        actix_web::http::header::HeaderValue::from_static("true"),
    );
    response
}
