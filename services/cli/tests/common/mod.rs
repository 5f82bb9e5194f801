//! A real `meridian` region on loopback for the `meridianctl` tests, and the CLI run against it.
//!
//! The region binary is the one `cargo test --workspace` builds beside `meridianctl`. Every
//! test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

use serde_json::Value;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a region may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The client token the tests' regions may require.
pub const TOKEN: &str = "cli-test-token";

/// A region process, killed when dropped.
pub struct Region {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Region {
    /// Starts a region with `extra` config lines and waits until it is ready.
    pub fn start(extra: &str) -> Region {
        let ctl = PathBuf::from(env!("CARGO_BIN_EXE_meridianctl"));
        let binary = ctl.with_file_name("meridian");
        assert!(
            binary.exists(),
            "{} is not built: run `cargo test --workspace` (or `cargo build -p meridian-region`)",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = dir.path().join("region.toml");
        let data = dir.path().join("data");
        std::fs::write(
            &config,
            format!(
                "region = \"us-east\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {data:?}\n{extra}\n"
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let mut command = Command::new(binary);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log);
        // The config file is the whole truth, whatever the environment the tests run in.
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("MERIDIAN_") || name.starts_with("OTEL_") || name == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        let child = command.spawn().expect("spawn meridian");
        let mut region = Region {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !region.ready() {
            let exited = region.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let log = std::fs::read_to_string(region.dir.path().join("log"));
                panic!("region not ready ({exited:?}); its log: {log:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        region
    }

    /// `GET /readyz` answered 200 (a plain request: no client runtime needed for a probe).
    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let authority = self.url.trim_start_matches("http://");
        let Ok(mut stream) = std::net::TcpStream::connect(authority) else {
            return false;
        };
        let request =
            format!("GET /readyz HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        let mut answer = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut answer).is_ok()
            && answer.starts_with("HTTP/1.1 200")
    }

    /// Runs `meridianctl --url <region> --token <TOKEN> <args>`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_meridianctl"))
            .args(["--url", &self.url, "--token", TOKEN])
            .args(args)
            .output()
            .expect("run meridianctl")
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a `meridianctl` run printed on stdout, as JSON.
pub fn stdout_json(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}
