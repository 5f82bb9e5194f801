//! Black-box harness: runs the real `meridian` binary on loopback with a temporary data
//! directory and talks HTTP to it.
//!
//! Every test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

use reqwest::header::HeaderMap;
use reqwest::{Client, Method};
use serde_json::Value;
use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a region may take to answer `GET /readyz` with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a region may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on every HTTP request a test makes.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster id every test region is configured with.
pub const CLUSTER_ID: &str = "test";

/// One running region: its process, its port and its temporary directory
/// (`config.toml`, `data/`, `meridian.log`).
pub struct Region {
    name: String,
    port: u16,
    dir: TempDir,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    client: Client,
    /// Extra environment for the process.
    env: Vec<(String, String)>,
}

/// One HTTP answer: status, headers, the body parsed as JSON (`Null` when it is not JSON) and
/// the raw body text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// A response header as text (`None` when absent or not visible ASCII).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `body["context"]` as a string; panics with the reply when missing.
    pub fn context(&self) -> String {
        match self.body["context"].as_str() {
            Some(ctx) if !ctx.is_empty() => ctx.to_string(),
            _ => panic!("reply has no non-empty \"context\": {self:?}"),
        }
    }

    /// Asserts the status, then returns the body.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "unexpected status; reply: {self:?}");
        &self.body
    }
}

impl Region {
    /// Starts region `name` with the default test configuration and waits until it is ready.
    pub async fn start(name: &str) -> Region {
        Region::start_with(name, "").await
    }

    /// Starts region `name` with `extra` appended to its TOML configuration (top-level keys
    /// first, then tables such as `[security]`) and waits until it is ready.
    pub async fn start_with(name: &str, extra: &str) -> Region {
        Region::start_with_env(name, extra, &[]).await
    }

    /// Like [`Region::start_with`], with extra environment variables for the process (they
    /// survive restarts), e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub async fn start_with_env(name: &str, extra: &str, env: &[(&str, &str)]) -> Region {
        let mut region = Region::launch(name, extra, env);
        region.wait_ready().await;
        region
    }

    /// Starts the process without waiting for it to be ready (see [`Region::wait_ready`]).
    pub fn launch(name: &str, extra: &str, env: &[(&str, &str)]) -> Region {
        // The prefix leaves the region name out of every path, so a log line that names the
        // region means it.
        let dir = tempfile::Builder::new()
            .prefix("meridian-test-")
            .tempdir()
            .expect("create temporary directory");
        let data_dir = dir.path().join("data");
        fs::create_dir_all(&data_dir).expect("create data directory");
        let port = free_port();
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            config_toml(name, port, &data_dir, CLUSTER_ID, extra),
        )
        .expect("write config");
        let log = dir.path().join("meridian.log");
        let mut region = Region {
            name: name.to_string(),
            port,
            dir,
            config,
            log,
            child: None,
            client: new_client(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        region.spawn();
        region
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("region process running").id()
    }

    /// The region name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The data directory (survives restarts; removed when the `Region` is dropped).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A client for tasks that need their own handle (cheap clone, shared pool).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Everything the process (and earlier runs of it) wrote to stdout/stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap: the crash case, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process keeps its sockets (connections are accepted, requests queue
    /// unread) but does nothing until [`Region::resume`]: a hung or paused region.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Region::pause`]: it reads what queued meanwhile.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("the region is not running");
        // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
    }

    /// SIGTERM and wait for a graceful exit (bounded); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("stop() on a region that is not running");
        // SAFETY: plain kill(2) on the pid of a child we have not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for region") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "region {} did not exit within {:?} of SIGTERM; log:\n{}",
                    self.name,
                    STOP_TIMEOUT,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the configuration with a new `extra` part (same name, port, data directory and
    /// cluster id); it takes effect at the next [`Region::restart`].
    pub fn reconfigure(&mut self, extra: &str) {
        let data_dir = self.data_dir();
        fs::write(
            &self.config,
            config_toml(&self.name, self.port, &data_dir, CLUSTER_ID, extra),
        )
        .expect("rewrite config");
    }

    /// Starts the process again with the same config, data directory and port (stopping it
    /// gracefully first if it still runs) and waits until it is ready.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        // Connections pooled to the previous process are dead.
        self.client = new_client();
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the (stopped) process again without waiting for it: regions started together
    /// with [`Region::relaunch`], then each awaited with [`Region::wait_ready`].
    pub fn relaunch(&mut self) {
        self.client = new_client();
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "region {} already running", self.name);
        let child = spawn_meridian(&self.config, &self.log, &self.env);
        self.child = Some(child);
    }

    /// Waits until the process answers `/readyz` with 200.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/readyz", self.url());
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "region {} exited before it was ready ({status}); log:\n{}",
                        self.name,
                        self.log()
                    );
                }
            }
            let probe = self
                .client
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&probe, Ok(resp) if resp.status().as_u16() == 200) {
                return;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "region {} not ready within {:?} (last probe: {:?}); log:\n{}",
                    self.name,
                    READY_TIMEOUT,
                    probe.map(|r| r.status()),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Any request; panics on a transport error (the server must always answer).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serialize body"));
        self.call_raw(method, path, bytes, headers).await
    }

    /// A request with a raw body sent as `Content-Type: application/json` (for malformed JSON
    /// and oversized bodies); panics on a transport error.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let what = format!("{method} {path}");
        match send(&self.client, &self.url(), method, path, body, headers).await {
            Ok(reply) => reply,
            Err(err) => panic!(
                "{what} on region {} failed: {err}; log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, None, &[]).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.call(Method::GET, path, None, headers).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.call(Method::PUT, path, Some(body), &[]).await
    }

    pub async fn put_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        self.call(Method::PUT, path, Some(body), headers).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.call(Method::POST, path, Some(body), &[]).await
    }

    pub async fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        self.call(Method::POST, path, Some(body), headers).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, None, &[]).await
    }

    /// `PUT /v1/buckets/{name}` with `{"type": kind}`, asserting 201.
    pub async fn create_bucket(&self, name: &str, kind: &str) -> Value {
        let reply = self
            .put(&bucket_path(name), &serde_json::json!({ "type": kind }))
            .await;
        assert_eq!(
            reply.status, 201,
            "create bucket {name} ({kind}): {reply:?}"
        );
        reply.body
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail = &log[floor_char_boundary(&log, log.len().saturating_sub(16 * 1024))..];
            eprintln!(
                "--- log of region {} (tail) ---\n{tail}\n--- end ---",
                self.name
            );
        }
        self.kill9();
    }
}

/// Sends one request without panicking on transport errors (for use while a region is being
/// killed).
pub async fn send(
    client: &Client,
    base: &str,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Result<Reply, reqwest::Error> {
    let mut req = client.request(method, format!("{base}{path}"));
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        headers,
        body,
        text,
    })
}

/// Asserts an error reply: status, `{"error": {"code", "message"}}` with the given code and a
/// non-empty message, and a JSON content type.
#[track_caller]
pub fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        reply.status, status,
        "expected {status} {code}; got reply: {reply:?}"
    );
    let error = &reply.body["error"];
    assert!(
        error.is_object(),
        "error body must be {{\"error\": {{...}}}}; got {reply:?}"
    );
    assert_eq!(
        error["code"].as_str(),
        Some(code),
        "wrong error code; reply: {reply:?}"
    );
    let message = error["message"].as_str().unwrap_or("");
    assert!(
        !message.trim().is_empty(),
        "error message must be a non-empty string; reply: {reply:?}"
    );
    let content_type = reply.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("application/json"),
        "error bodies are application/json; got content-type {content_type:?}; reply: {reply:?}"
    );
}

/// Asserts the key-response headers of the contract: `X-Meridian-Region` and `X-Meridian-Home`
/// (both `region` in a one-region cluster) and a non-empty `X-Meridian-Session`.
#[track_caller]
pub fn assert_key_headers(reply: &Reply, region: &str) {
    assert_eq!(
        reply.header("x-meridian-region"),
        Some(region),
        "X-Meridian-Region; reply: {reply:?}"
    );
    assert_eq!(
        reply.header("x-meridian-home"),
        Some(region),
        "X-Meridian-Home; reply: {reply:?}"
    );
    let session = reply.header("x-meridian-session").unwrap_or("");
    assert!(!session.is_empty(), "X-Meridian-Session; reply: {reply:?}");
}

/// Percent-encodes one path segment or query value (everything but RFC 3986 unreserved bytes).
pub fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `/v1/buckets/{bucket}`.
pub fn bucket_path(bucket: &str) -> String {
    format!("/v1/buckets/{}", enc(bucket))
}

/// `/v1/kv/{bucket}/{key}`.
pub fn kv(bucket: &str, key: &str) -> String {
    format!("/v1/kv/{}/{}", enc(bucket), enc(key))
}

/// Runs `meridian serve` as region `region` of cluster `cluster_id` on `data_dir` and waits
/// (bounded by `timeout`) for it to exit on its own. Returns the exit status (`None` if it was
/// still running at the deadline and had to be killed) and its output.
pub fn run_until_exit(
    region: &str,
    data_dir: &Path,
    cluster_id: &str,
    timeout: Duration,
) -> (Option<ExitStatus>, String) {
    run_until_exit_on(free_port(), region, data_dir, cluster_id, timeout)
}

/// Like [`run_until_exit`], listening on `port`.
pub fn run_until_exit_on(
    port: u16,
    region: &str,
    data_dir: &Path,
    cluster_id: &str,
    timeout: Duration,
) -> (Option<ExitStatus>, String) {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let config = dir.path().join("config.toml");
    fs::write(&config, config_toml(region, port, data_dir, cluster_id, "")).expect("write config");
    let log = dir.path().join("meridian.log");
    let mut child = spawn_meridian(&config, &log, &[]);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for meridian") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, fs::read_to_string(&log).unwrap_or_default())
}

fn spawn_meridian(config: &Path, log: &Path, env: &[(String, String)]) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log file");
    let err = out.try_clone().expect("clone log file handle");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // The config file is the whole truth: no MERIDIAN_* overrides or exporters from the
    // environment the tests happen to run in.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        // RUST_LOG too: tests read the log, and its lines depend on the filter.
        if key.starts_with("MERIDIAN_") || key.starts_with("OTEL_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.spawn().expect("spawn meridian binary")
}

fn config_toml(region: &str, port: u16, data_dir: &Path, cluster_id: &str, extra: &str) -> String {
    format!(
        "region = {}\nlisten = {}\ndata_dir = {}\ncluster_id = {}\n{extra}\n",
        toml_str(region),
        toml_str(&format!("127.0.0.1:{port}")),
        toml_str(&data_dir.to_string_lossy()),
        toml_str(cluster_id),
    )
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A loopback port that was free a moment ago, below the kernel's range of ephemeral ports: a
/// region restarts on its port, and meanwhile any outgoing connection (every test's clients
/// and regions make them) may be given a port from that range (a restart once failed with
/// "Address already in use" so).
fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_from = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let from = ephemeral_from.saturating_sub(12_000).max(1024);
    let span = ephemeral_from.saturating_sub(from);
    let attempts = if span >= 1000 { 1000u64 } else { 0 };
    for attempt in 0..attempts {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(attempt);
        let port = from + (hasher.finish() % u64::from(span)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // No room below the range: any free port.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn new_client() -> Client {
    Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .expect("build HTTP client")
}

fn floor_char_boundary(s: &str, mut index: usize) -> usize {
    while index > 0 && !s.is_char_boundary(index) {
        index -= 1;
    }
    index
}

/// A peer's call on `/internal/v1/{route}` with a postcard body.
pub async fn internal<T: serde::Serialize, R: serde::de::DeserializeOwned>(
    region: &Region,
    route: &str,
    body: &T,
) -> R {
    use meridian_shared::wire::{CLUSTER_HEADER, PEER_HEADER};
    let reply = region
        .client()
        .post(format!("{}/internal/v1/{route}", region.url()))
        .header(PEER_HEADER, "a-peer")
        .header(CLUSTER_HEADER, CLUSTER_ID)
        .body(meridian_shared::wire::encode(body))
        .send()
        .await
        .expect("the region answers");
    assert_eq!(reply.status(), 200, "{route}");
    let bytes = reply.bytes().await.expect("a body");
    meridian_shared::wire::decode(&bytes).expect("a postcard answer")
}
