//! Multi-region support for integration tests: real `meridian` processes on loopback, every
//! directed link between them through a [`proxy::Link`] the test controls.
#![allow(dead_code)]

pub mod proxy;

use crate::common::{kv, Region};
use meridian_shared::home::rendezvous;
use meridian_shared::RegionName;
use proxy::Link;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// Settings every cluster test region gets unless it sets them itself: fast failure detection
/// keeps tests short.
pub const FAST: &str =
    "heartbeat_interval_ms = 100\ndown_after_missed = 3\nforward_timeout_ms = 1000\n";

/// For tests whose first request after a fault must find the peer still up (outcome unknown,
/// not failover): a second of missed heartbeats, not 0.3 s, before it is declared down.
pub const SLOW_DOWN: &str = "down_after_missed = 10\n";

/// Setting in a line of TOML `key = value`.
fn key_of(line: &str) -> &str {
    line.split('=').next().unwrap_or_default().trim()
}

/// [`FAST`] without the settings `extra` gives itself (TOML refuses a key set twice).
fn fast_unless_set(extra: &str) -> String {
    FAST.lines()
        .filter(|fast| !extra.lines().any(|line| key_of(line) == key_of(fast)))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Three (or more) regions, fully meshed through test-owned proxies.
pub struct Cluster {
    pub regions: Vec<Region>,
    /// `(from, to)` → the proxy `from` uses to reach `to`.
    links: BTreeMap<(String, String), Link>,
}

impl Cluster {
    /// Starts the named regions with `extra` config and waits until all see each other up.
    pub async fn start(names: &[&str], extra: &str) -> Cluster {
        Cluster::start_with_env(names, extra, &[]).await
    }

    /// Like [`Cluster::start`], with extra environment variables for every region.
    pub async fn start_with_env(names: &[&str], extra: &str, env: &[(&str, &str)]) -> Cluster {
        let mut links = BTreeMap::new();
        for from in names {
            for to in names.iter().filter(|to| *to != from) {
                links.insert((from.to_string(), to.to_string()), Link::start());
            }
        }
        let mut regions = Vec::new();
        for name in names {
            let mut config = format!("{}{extra}\n[peers]\n", fast_unless_set(extra));
            for peer in names.iter().filter(|p| *p != name) {
                let link = &links[&(name.to_string(), peer.to_string())];
                config.push_str(&format!("{peer} = \"{}\"\n", link.url()));
            }
            regions.push(Region::launch(name, &config, env));
        }
        for ((_, to), link) in &links {
            let target = regions
                .iter()
                .find(|r| r.name() == to)
                .expect("target region");
            link.set_target(port_of(&target.url()));
        }
        // All at once, as a new cluster starts: they answer each other's start-up questions.
        for region in regions.iter_mut() {
            region.wait_ready().await;
        }
        let cluster = Cluster { regions, links };
        cluster.wait_all_up().await;
        cluster
    }

    /// A region by name.
    pub fn region(&self, name: &str) -> &Region {
        self.regions
            .iter()
            .find(|r| r.name() == name)
            .expect("region exists")
    }

    /// A region by name, mutably (to kill or restart it).
    pub fn region_mut(&mut self, name: &str) -> &mut Region {
        self.regions
            .iter_mut()
            .find(|r| r.name() == name)
            .expect("region exists")
    }

    /// The link `from` uses to reach `to`.
    pub fn link(&self, from: &str, to: &str) -> &Link {
        &self.links[&(from.to_string(), to.to_string())]
    }

    /// Every link into and out of `name`.
    pub fn links_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Link> + 'a {
        self.links
            .iter()
            .filter(move |((from, to), _)| from == name || to == name)
            .map(|(_, link)| link)
    }

    /// Partitions `name` away from every other region (connections refused both ways).
    pub fn cut_off(&self, name: &str) {
        self.links_of(name).for_each(Link::cut);
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        self.links.values().for_each(Link::heal);
    }

    /// Every link.
    pub fn all_links(&self) -> impl Iterator<Item = (&(String, String), &Link)> {
        self.links.iter()
    }

    /// Region names.
    pub fn names(&self) -> Vec<String> {
        self.regions.iter().map(|r| r.name().to_string()).collect()
    }

    /// The home region of a key in a bucket without a fixed home (same rule as the server).
    pub fn home_of(&self, bucket: &str, key: &str) -> String {
        let names: Vec<RegionName> = self
            .names()
            .into_iter()
            .map(|n| RegionName::new(n).expect("valid region name"))
            .collect();
        rendezvous(&names, bucket, key)
            .expect("some home")
            .to_string()
    }

    /// A key of `bucket` whose home is `home`.
    pub fn key_homed_at(&self, bucket: &str, home: &str, prefix: &str) -> String {
        (0..10_000)
            .map(|i| format!("{prefix}{i}"))
            .find(|k| self.home_of(bucket, k) == home)
            .expect("a key for every region")
    }

    /// What `at` reports about `peer` in /v1/cluster (`up` / `down`).
    pub async fn status_of(&self, at: &str, peer: &str) -> String {
        let view = self.region(at).get("/v1/cluster").await;
        view.body["regions"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["name"] == peer))
            .and_then(|r| r["status"].as_str())
            .unwrap_or("missing")
            .to_string()
    }

    /// Waits until every running region sees every other one up.
    pub async fn wait_all_up(&self) {
        let names = self.names();
        eventually(
            Duration::from_secs(20),
            "every region sees every peer up",
            || async {
                for at in &names {
                    for peer in names.iter().filter(|p| *p != at) {
                        if self.status_of(at, peer).await != "up" {
                            return false;
                        }
                    }
                }
                true
            },
        )
        .await;
    }

    /// Creates `(name, type)` buckets at region `at` (homed at `home` when given) and waits
    /// until every region has their definitions.
    pub async fn create_buckets(&self, at: &str, buckets: &[(&str, &str)], home: Option<&str>) {
        for (name, kind) in buckets {
            let body = match home {
                Some(home) => serde_json::json!({"type": kind, "home_region": home}),
                None => serde_json::json!({"type": kind}),
            };
            self.region(at)
                .put(&format!("/v1/buckets/{name}"), &body)
                .await
                .expect(201);
        }
        let listed = self.region(at).get("/v1/buckets").await;
        let count = listed.body["buckets"].as_array().map_or(0, Vec::len);
        self.wait_buckets(count).await;
    }

    /// Waits until every region lists at least `count` buckets (definitions replicate).
    pub async fn wait_buckets(&self, count: usize) {
        eventually(
            Duration::from_secs(20),
            "bucket definitions replicate",
            || async {
                for region in &self.regions {
                    let list = region.get("/v1/buckets").await;
                    if list.body["buckets"].as_array().map_or(0, Vec::len) < count {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    /// Waits until `at` considers `peer` to have status `status`.
    pub async fn wait_status(&self, at: &str, peer: &str, status: &str) {
        eventually(
            Duration::from_secs(15),
            &format!("{at} sees {peer} {status}"),
            || async { self.status_of(at, peer).await == status },
        )
        .await;
    }

    /// Waits until every region answers the same body for `GET path`, and returns it.
    pub async fn converged(&self, path: &str, timeout: Duration) -> Value {
        let mut last = BTreeMap::new();
        let deadline = Instant::now() + timeout;
        loop {
            last.clear();
            for region in &self.regions {
                let reply = region.get(path).await;
                let mut body = reply.body.clone();
                if let Some(obj) = body.as_object_mut() {
                    obj.remove("context"); // contexts are equal when states are; compare values
                }
                last.insert(region.name().to_string(), (reply.status, body));
            }
            let first = last.values().next().cloned();
            if last.values().all(|v| Some(v) == first.as_ref()) {
                return first.map(|(_, b)| b).unwrap_or(Value::Null);
            }
            if Instant::now() >= deadline {
                panic!("regions did not converge on {path} within {timeout:?}: {last:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Polls `check` until it is true, panicking with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sum of every sample (Prometheus text) of `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The port of a `http://127.0.0.1:PORT` URL.
pub fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("url with port")
}

/// `/v1/kv/{bucket}/{key}` (re-exported for brevity in tests).
pub fn key_path(bucket: &str, key: &str) -> String {
    kv(bucket, key)
}
