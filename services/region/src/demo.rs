//! `meridian demo`: N regions as child processes on 127.0.0.1, each a real `meridian serve`.

use anyhow::{bail, Context};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NAMES: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// One demo region.
struct DemoRegion {
    name: String,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    /// Where this run's part of the log starts (earlier runs' lines are kept above it).
    log_from: u64,
}

/// The ports of `count` regions from `base`, if they all fit (port 0 would be any free port,
/// which the other regions could not know).
fn ports(base: u16, count: usize) -> Option<Vec<u16>> {
    (0..count)
        .map(|i| {
            u16::try_from(i)
                .ok()
                .and_then(|i| base.checked_add(i))
                .filter(|port| *port != 0)
        })
        .collect()
}

/// Region names for a demo of `count` regions.
pub fn region_names(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            NAMES
                .get(i)
                .map_or_else(|| format!("region-{}", i + 1), |n| n.to_string())
        })
        .collect()
}

/// Starts the regions, prints how to use them, and stops them on Ctrl-C, SIGTERM or SIGHUP.
pub fn run(count: usize, base_port: u16, data_dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let ports = ports(base_port, count)
        .with_context(|| format!("--base-port {base_port} leaves no port for {count} regions"))?;
    let mut regions: Vec<DemoRegion> = region_names(count)
        .into_iter()
        .zip(ports)
        .map(|(name, port)| DemoRegion {
            config: data_dir.join(format!("{name}.toml")),
            log: data_dir.join(format!("{name}.log")),
            log_from: 0,
            name,
            port,
        })
        .collect();
    // Before any file is touched: a demo already running on these ports keeps its logs, and
    // its regions are not taken for ours.
    for region in &regions {
        std::net::TcpListener::bind(("127.0.0.1", region.port)).with_context(|| {
            format!(
                "port {} for {} is in use (is a demo already running?)",
                region.port, region.name
            )
        })?;
    }
    // A demo on other ports but this directory would rewrite the running one's configs and
    // then fail on its databases: refused before that. Held until this demo ends.
    let lock_path = data_dir.join("demo.lock");
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another demo is using {} (stop it first, or pass another --data-dir)",
            data_dir.display()
        ),
        Err(fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("cannot lock {}", lock_path.display()))
        }
    }
    let workers = workers_per_region(count);
    for region in &regions {
        fs::write(
            &region.config,
            config_for(region, &regions, &data_dir, workers),
        )?;
    }

    let exe = std::env::current_exe().context("cannot find the meridian binary")?;
    let mut children: Vec<Child> = Vec::new();
    for region in regions.iter_mut() {
        // Appended to: a region that died in the last run keeps its log for reading.
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&region.log)?;
        region.log_from = log.seek(SeekFrom::End(0))?;
        let mut command = Command::new(&exe);
        // Their own process group: a terminal's Ctrl-C or hangup reaches the demo alone, which
        // stops every region gracefully (a hangup would otherwise kill them outright).
        command.process_group(0);
        let demo = std::process::id();
        // SAFETY: prctl and getppid are plain system calls (async-signal-safe); nothing is
        // allocated between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // A demo killed outright (SIGKILL) still stops its regions instead of
                // orphaning them on its ports.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Gone before the flag was set: no signal would come.
                if u32::try_from(libc::getppid()) != Ok(demo) {
                    return Err(std::io::Error::other("the demo exited"));
                }
                Ok(())
            });
        }
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&region.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start region {}", region.name))?;
        children.push(child);
    }

    let started = wait_ready(&regions, &mut children);
    if let Err(error) = started {
        stop(&mut children);
        return Err(error);
    }
    print_banner(&regions, &data_dir);

    let outcome = wait_for_stop(&regions, &mut children);
    stop(&mut children);
    // Not println!: after a hangup the terminal is gone, and a failed write would panic.
    let _ = writeln!(
        std::io::stdout(),
        "demo stopped; data kept in {}",
        data_dir.display()
    );
    outcome
}

/// HTTP workers for each of `count` regions sharing this machine: its share of the cores (not
/// pinned: the regions would pin onto the same ones). Threads beyond the cores only add
/// hand-offs; three regions on 2 cores replicated faster with one worker each than with two.
fn workers_per_region(count: usize) -> usize {
    (crate::config::cores() / count.max(1)).max(1)
}

fn config_for(region: &DemoRegion, all: &[DemoRegion], data_dir: &Path, workers: usize) -> String {
    let mut config = format!(
        "region = \"{}\"\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\ncluster_id = \"demo\"\nworkers = {workers}\npin_workers = false\n\n[peers]\n",
        region.name,
        region.port,
        data_dir.join(&region.name).display()
    );
    for peer in all.iter().filter(|p| p.name != region.name) {
        config.push_str(&format!(
            "{} = \"http://127.0.0.1:{}\"\n",
            peer.name, peer.port
        ));
    }
    config
}

/// Waits (bounded) until every region answers `/readyz` with 200.
fn wait_ready(regions: &[DemoRegion], children: &mut [Child]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (region, child) in regions.iter().zip(children.iter_mut()) {
        loop {
            if let Some(status) = child.try_wait()? {
                let log = this_runs_log(region);
                bail!(
                    "region {} exited ({status}) before it was ready:\n{log}",
                    region.name
                );
            }
            if readyz(region.port) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "region {} was not ready within 30 s; see {}",
                    region.name,
                    region.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// The part of a region's log written in this run.
fn this_runs_log(region: &DemoRegion) -> String {
    let log = fs::read(&region.log).unwrap_or_default();
    let from = usize::try_from(region.log_from).map_or(log.len(), |from| from.min(log.len()));
    String::from_utf8_lossy(&log[from..]).into_owned()
}

/// A one-shot `GET /readyz` over a plain socket (the server crate has no HTTP client).
fn readyz(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

fn wait_for_stop(regions: &[DemoRegion], children: &mut [Child]) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        // A closed terminal stops the demo as Ctrl-C does.
        let mut hangup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
                _ = hangup.recv() => return Ok(()),
                _ = tick.tick() => {
                    for (region, child) in regions.iter().zip(children.iter_mut()) {
                        if let Some(status) = child.try_wait()? {
                            bail!("region {} exited unexpectedly ({status}); see {}", region.name, region.log.display());
                        }
                    }
                }
            }
        }
    })
}

/// SIGTERM every child (graceful: in-flight writes finish), then SIGKILL stragglers after 10 s.
fn stop(children: &mut [Child]) {
    for child in children.iter() {
        // SAFETY: sending a signal to our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn print_banner(regions: &[DemoRegion], data_dir: &Path) {
    let count = match regions.len() {
        1 => "1 region".to_string(),
        n => format!("{n} regions"),
    };
    println!("Meridian demo: {count} on 127.0.0.1 (cluster \"demo\")");
    for region in regions {
        println!(
            "  {:<10} http://127.0.0.1:{}   log: {}",
            region.name,
            region.port,
            region.log.display()
        );
    }
    let url = format!("http://127.0.0.1:{}", regions[0].port);
    println!(
        "\nTry:\n  curl -X PUT {url}/v1/buckets/users -d '{{\"type\":\"register\"}}'\n  \
         curl -X PUT {url}/v1/kv/users/alice -d '{{\"name\":\"Alice\"}}'\n  \
         curl {url}/v1/kv/users/alice\n  \
         curl {url}/v1/cluster\n\nData: {}\nCtrl-C stops every region.",
        data_dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_port_in_use_is_refused_before_any_file_is_written() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = busy.local_addr().expect("addr").port();
        let dir = tempfile::tempdir().expect("tempdir");
        let refused = run(1, port, dir.path()).map_err(|e| format!("{e:#}"));
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("in use")),
            "{refused:?}"
        );
        let written = fs::read_dir(dir.path()).expect("read dir").count();
        assert_eq!(written, 0, "no config or log written");
    }

    #[test]
    fn a_directory_another_demo_uses_is_refused_before_any_file_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = fs::File::create(dir.path().join("demo.lock")).expect("lock file");
        held.lock().expect("lock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let refused = run(1, port, dir.path()).map_err(|e| format!("{e:#}"));
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("another demo")),
            "{refused:?}"
        );
        let written: Vec<_> = fs::read_dir(dir.path())
            .expect("read dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(written, vec![std::ffi::OsString::from("demo.lock")]);
    }

    #[test]
    fn ports_that_do_not_fit_are_refused() {
        assert_eq!(ports(7001, 3), Some(vec![7001, 7002, 7003]));
        assert_eq!(ports(65533, 3), Some(vec![65533, 65534, 65535]));
        assert_eq!(ports(65534, 3), None, "wraps past 65535");
        assert_eq!(ports(0, 3), None, "port 0 is any free port");
    }

    #[test]
    fn each_region_gets_its_share_of_the_cores_and_every_other_region_as_a_peer() {
        let dir = Path::new("/tmp/meridian-demo-test");
        let regions: Vec<DemoRegion> = region_names(3)
            .into_iter()
            .enumerate()
            .map(|(i, name)| DemoRegion {
                port: 7001 + i as u16,
                config: dir.join(format!("{name}.toml")),
                log: dir.join(format!("{name}.log")),
                log_from: 0,
                name,
            })
            .collect();
        let workers = workers_per_region(3);
        let cores = crate::config::cores();
        assert!(workers >= 1 && (workers * 3 <= cores || workers == 1));
        let config = Config::load_from_str(&config_for(&regions[1], &regions, dir, workers))
            .expect("a valid config");
        assert_eq!(config.region.as_str(), "eu-west");
        assert_eq!(config.worker_threads(), workers);
        assert!(!config.pin_workers);
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.cluster_id, "demo");
    }
}
