//! `meridianctl`'s one-shot commands against a real `meridian` region on loopback.

mod common;

use common::Region;
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn json(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "meridianctl failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn put_reads_a_value_too_long_for_a_command_line_from_stdin() {
    let region = Region::start("");
    json(&region.ctl(&["bucket", "create", "docs", "--type", "register"]));
    // Over the 128 KiB a single command-line argument may have on Linux.
    let long = "x".repeat(200 * 1024);
    let mut put = Command::new(env!("CARGO_BIN_EXE_meridianctl"))
        .args(["--url", &region.url, "put", "docs", "big", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meridianctl");
    let mut stdin = put.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{long:?}").as_bytes())
        .expect("write the value");
    drop(stdin);
    json(&put.wait_with_output().expect("meridianctl put"));
    let read = json(&region.ctl(&["get", "docs", "big"]));
    assert_eq!(read["values"], serde_json::json!([long]));
}

#[test]
fn list_reads_at_either_consistency_a_listing_has() {
    let region = Region::start("");
    json(&region.ctl(&["bucket", "create", "users", "--type", "register"]));
    json(&region.ctl(&["put", "users", "alice", "1"]));
    // The region accepts both levels the CLI offers (it answers 400 to any other value).
    let listed = json(&region.ctl(&["list", "users", "--consistency", "session"]));
    assert_eq!(listed["keys"], serde_json::json!(["alice"]));
    let local = json(&region.ctl(&["list", "users", "--consistency", "local"]));
    assert_eq!(local["keys"], serde_json::json!(["alice"]));
    // Not a listing's level: refused by the CLI itself, before any request.
    let refused = region.ctl(&["list", "users", "--consistency", "home"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
}
